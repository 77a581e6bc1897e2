//! `sakuga`: a render scheduler for AI anime, comic and style pipelines, with the ops
//! signals that keep such a pipeline healthy built in.
//!
//! This crate is the composition root: it reads configuration, builds the node
//! environment (folders, device, model store and cache) and wires the member crates into
//! the `sakuga` command line.
//!
//! Module map:
//! - [`config`]: the TOML/env/flag configuration, plain data.
//! - [`runtime`]: building the node environment and registry from a config.
//! - [`cli`]: the `sakuga` commands.
//! - [`server`]: the gRPC services on one port, auth, health, reflection, shutdown.
//! - [`comfy`]: ComfyUI's HTTP + WebSocket API on the same engine.
//! - [`client`]: helpers for talking to a server (`submit`, `watch`, `signals`).
//! - [`report`]: `sakuga report`, the weekly review from the job history or Prometheus.

pub mod cli;
pub mod client;
pub mod cluster;
pub mod comfy;
pub mod config;
pub mod jobs;
pub mod report;
pub mod runtime;
pub mod server;
