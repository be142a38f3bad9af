//! Keygate server integration tests: ONE test binary (link time adds up on 2 cores). Each test drives a
//! real server on a random port over HTTP, with a real SQLite file in a temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly on purpose")]

mod admin;
mod agents;
mod authcode;
mod bad_input;
mod console;
mod device;
mod dpop;
mod events;
mod exchange;
mod gateway;
mod hardening;
mod helpers;
mod import;
mod limits;
mod oauth;
mod operations;
mod ops;
mod pats;
mod portal;
mod verify;
