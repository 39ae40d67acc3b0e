mod faults;
mod shutdown;
mod support;
mod support_selftest;
