pub mod admin;
pub mod ops;
pub mod verify;
