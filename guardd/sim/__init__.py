"""A simulated IB Gateway speaking the TWS API text protocol (server version 178)."""
