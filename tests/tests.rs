//! One integration-test binary (every extra binary would link libtorch again).
mod bench;
mod common;
mod data;
mod fg;
mod imagefolder;
mod imagenet_resnet;
mod model;
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
