"""A simulated IB Gateway speaking the TWS API (text wire from server version 178, protobuf from
201): a program of its own, importing nothing of guardd (`ibsim`, `guardd sim`, `guardd demo`)."""
