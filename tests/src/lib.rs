//! Harness for guard end-to-end tests.
