//! mesh-control: nodemesh's control plane. Today: the workload certificate authority, with node
//! authentication (local mode: per-node tokens) and node authorization (a node obtains only the
//! identities of pods scheduled on it), served over gRPC with TLS.

pub mod attestation;
pub mod ca;
pub mod control_plane;
pub mod discovery;
pub mod manifest_watch;
pub mod metrics;
pub mod node_auth;
pub mod service;
pub mod status;
pub mod tls;
pub mod xds;
