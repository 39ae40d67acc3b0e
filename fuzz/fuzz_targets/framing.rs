//! The gRPC framing and event counting of request bodies (`ingest::api::framing`),
//! against any bytes in any chunking: `ingest::properties::framing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how many chunk boundaries, the next two bytes each where.
    let (cuts, body) = match data.split_first() {
        Some((&n, rest)) => {
            let n = usize::from(n % 8).min(rest.len() / 2);
            let (cuts, body) = rest.split_at(n * 2);
            let cuts: Vec<usize> = cuts
                .chunks(2)
                .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            (cuts, body)
        }
        None => (Vec::new(), data),
    };
    ingest::properties::framing(body, &cuts);
});
