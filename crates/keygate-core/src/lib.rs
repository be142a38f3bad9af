//! Keygate's pure logic: no I/O, no async, no clock reads except through arguments.
//!
//! Everything here is cheap to test and to benchmark: credential formats and hashing
//! ([`credential`]), scopes ([`scope`]), verify decision codes ([`decision`]), identifiers ([`id`]),
//! rate limits and quotas ([`limits`]), the client address behind proxies ([`forwarded`]), OAuth form
//! bodies and token claims ([`oauth`]) and input rules shared by every surface ([`validate`]).

pub mod credential;
pub mod decision;
pub mod events;
pub mod forwarded;
pub mod id;
pub mod limits;
pub mod oauth;
pub mod scope;
pub mod validate;

#[cfg(test)]
mod properties;

pub use credential::{CredentialError, Environment, ParsedSecret, PlainSecret, SecretHash, SecretKind};
pub use decision::DecisionCode;
