//! SQLite state and the append-only audit history (WAL, versioned schema, one writer).
