//! A small raw-socket vfio-user client for tests.
