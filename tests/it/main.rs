mod faults;
mod publish;
mod shutdown;
mod support;
mod support_selftest;
