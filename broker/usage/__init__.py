"""What requests cost: the usage ledger (SQLite), its queries, and model prices."""
