//! The HTTP side of pod-app: a server (`http-serve`) whose answers say who answered and what it
//! saw, a keep-alive / multiplexing client (`http-client`) that reports per status, per server
//! and per connection, and a raw TCP exchange (`raw`) for malformed requests no HTTP library
//! would send. They live in the library so they can be tested over loopback without the mesh.

pub mod client;
mod lenient;
pub mod raw;
pub mod server;

#[cfg(test)]
mod tests;
