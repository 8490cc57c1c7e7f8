//! One integration-test binary (every extra binary would link libtorch again).
mod bench;
mod common;
mod data;
mod fg;
mod model;
mod reference;
mod reliability;
mod report_study;
mod rules;
mod study;
mod sweep_grid;
mod sweep_report;
mod train;
mod variants;
