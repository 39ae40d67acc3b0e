mod faults;
mod publish;
mod python_client;
mod shutdown;
mod stream;
mod support;
mod support_selftest;
