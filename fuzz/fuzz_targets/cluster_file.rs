//! Cluster files (TOML) from arbitrary text: parsing never panics, and a map it
//! accepts writes back to a file that parses to the same map.
#![no_main]

use drs_proto::ClusterMap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(map) = ClusterMap::from_toml(text) {
        let again = map.to_toml().expect("an accepted map writes back");
        let back = ClusterMap::from_toml(&again).expect("a written map parses");
        assert_eq!(back, map, "cluster file round trip");
    }
});
