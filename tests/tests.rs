//! One integration-test binary (every extra binary would link libtorch again).
mod bench;
mod common;
mod data;
mod model;
mod reference;
mod reliability;
mod rules;
mod sweep_grid;
mod sweep_report;
mod train;
