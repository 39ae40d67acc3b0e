mod faults;
mod publish;
mod shutdown;
mod stream;
mod support;
mod support_selftest;
