//! Kestrel integration-test helpers.
