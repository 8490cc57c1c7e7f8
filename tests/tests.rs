//! One integration-test binary (every extra binary would link libtorch again).
mod bench;
mod common;
mod data;
mod fg;
mod fg_sgr;
mod imagefolder;
mod imagenet_resnet;
mod local_loss;
mod model;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(not(feature = "mpi"))]
mod no_mpi;
mod pipeline;
mod precision;
mod reference;
mod reliability;
mod report_study;
mod rules;
mod study;
mod svhn_stl;
mod sweep_grid;
mod sweep_report;
mod train;
mod variants;
