//! Keygate's pure logic: no I/O, no async, no clock reads except through arguments.
//!
//! Everything here is cheap to test and to benchmark: credential formats and hashing
//! ([`credential`]), scopes ([`scope`]), verify decision codes ([`decision`]), identifiers ([`id`])
//! and input rules shared by every surface ([`validate`]).

pub mod credential;
pub mod decision;
pub mod id;
pub mod limits;
pub mod scope;
pub mod validate;

pub use credential::{CredentialError, Environment, ParsedSecret, PlainSecret, SecretHash, SecretKind};
pub use decision::DecisionCode;
