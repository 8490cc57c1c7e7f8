//! One integration-test binary (every extra binary would link libtorch again).
mod common;
// mod data;
mod model;
mod rules;
mod train;
