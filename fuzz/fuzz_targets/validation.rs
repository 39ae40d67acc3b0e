//! Validation of any decodable `PublishRequest` (`ingest::validate`):
//! `ingest::properties::validation`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ingest::properties::validation(data);
});
