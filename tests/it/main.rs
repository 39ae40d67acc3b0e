mod faults;
mod private_node_selftest;
mod publish;
mod python_client;
mod shutdown;
mod stream;
mod support;
mod support_selftest;
