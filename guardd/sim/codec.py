"""TWS API messages at server version 178, as the simulated gateway writes and reads them.

TASK FOR THE CODEC ENGINEER (helper): fill in this module; delete this TASK block when done.
-------------------------------------------------------------------------------------------
Working rules: several engineers share this working tree. Edit ONLY guardd/sim/codec.py,
tests/test_sim_codec.py (and tests/conftest helpers you create under tests/sim_codec_*.py). Commit only
those: `git add FILES && git commit -q -m "msg" -- FILES`; never `git add -A`, reset, stash or checkout.
Don't touch pyproject.toml/uv.lock/README/scripts. Check with `.venv/bin/ruff check FILES`,
`.venv/bin/ruff format FILES`, `.venv/bin/mypy FILES` (strict), `.venv/bin/pytest -q tests/test_sim_codec.py`.
Read /work/shared/IB_PROTOCOL.md and the client sources in .venv/lib/python3.11/site-packages/{ibapi,ib_async}.
Report at the end: the API you wrote, what's tested, what's doubtful.

Every `*_fields` function returns the whole message as a list of fields, message id first, ready for
`guardd.sim.wire.encode_frame`. Field counts must be exact for BOTH ibapi 10.50.2 (Decoder with
serverVersion 178) and ib_async 2.1.0 (its Decoder at serverVersion 178): prove each encoder in tests by
decoding our fields with both libraries' own decoders and asserting the EWrapper callback arguments.
Prove each decoder by encoding with both libraries' own clients (EClient.placeOrder etc. writing into a
captured connection at serverVersion 178; ib_async Client likewise) and decoding with ours.

Server -> client (use the shared types in guardd/sim/types.py):
  next_valid_id_fields(order_id: int)                       # 9
  managed_accounts_fields(accounts: Sequence[str])          # 15
  current_time_fields(epoch: int)                           # 49
  error_fields(req_id: int, code: int, message: str, advanced_json: str = "")  # 4
  position_fields(pos: PositionView)                        # 61
  position_end_fields()                                     # 62
  account_summary_fields(req_id, account, tag, value, currency)  # 63
  account_summary_end_fields(req_id)                        # 64
  account_value_fields(key, value, currency, account)       # 6
  portfolio_fields(pos: PositionView)                       # 7
  account_time_fields(hhmm: str)                            # 8
  account_download_end_fields(account)                      # 54
  account_update_multi_fields(req_id, account, model_code, key, value, currency)  # 73
  account_update_multi_end_fields(req_id)                   # 74
  pnl_fields(req_id, daily, unrealized, realized)           # 94
  pnl_single_fields(req_id, pos, daily, unrealized, realized, value)  # 95
  open_order_fields(order: SimOrder)                        # 5 (the hard one: every field at 178)
  order_status_fields(order: SimOrder)                      # 3
  open_order_end_fields()                                   # 53
  completed_order_fields(order: SimOrder)                   # 101 (optional, reqCompletedOrders)
  completed_orders_end_fields()                             # 102
  exec_details_fields(req_id: int, fill: Fill)              # 11
  exec_details_end_fields(req_id)                           # 55
  commission_report_fields(fill: Fill)                      # 59
  tick_price_fields(req_id, tick_type, price, size, attr_mask=0)  # 1
  tick_size_fields(req_id, tick_type, size)                 # 2
  market_data_type_fields(req_id, market_data_type)         # 58
  contract_details_fields(req_id, instrument: Instrument)   # 10 (enough for ib_async qualifyContracts)
  contract_details_end_fields(req_id)                       # 52
Client -> server (fields = the whole frame, message id first; parse tolerantly: unset doubles may be
"1.7976931348623157e+308" or "", unset ints "2147483647" or ""):
  decode_place_order(fields) -> OrderRequest                # 3 (ibapi and ib_async layouts at 178)
  decode_cancel_order(fields) -> int (order id)             # 4
  decode_mkt_data_request(fields) -> MktDataRequest(req_id, contract: ContractSpec, generic_ticks, snapshot)
  decode_contract_details_request(fields) -> tuple[int, ContractSpec]   # 9
  decode_executions_request(fields) -> ExecutionsRequest(req_id, client_id, account, time, symbol, sec_type, exchange, side)
Raise `CodecError(ValueError)` with a clear message on malformed input (never IndexError).
-------------------------------------------------------------------------------------------
"""
