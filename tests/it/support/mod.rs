//! Shared integration-test kit: a TCP fault proxy to break the broker link on
//! demand, and broker-side helpers to observe what was actually published.
#![allow(dead_code, unused_imports)]

mod broker;
mod child;
mod load;
pub mod pki;
mod private_node;
mod proxy;
mod server;

pub use broker::{
    AMQP_ADDR, AMQP_URL, TestQueue, UNBOUND_TOPIC, assert_exactly_once, connect_broker, unique,
};
pub use child::ChildServer;
pub use load::{Load, LoadReport, run_load, run_load_with};
pub use private_node::PrivateNode;
pub use proxy::{CHUNK as PROXY_CHUNK, FaultProxy, Mode};
pub use server::{
    TestServer, http_get, json_event, publish_until_ok, request, spawn_ready_server, spawn_server,
    test_config,
};
