//! X-Forwarded-For / Forwarded: never panic; the answer is the peer or an address the headers named.
#![no_main]
use std::net::IpAddr;

use keygate_core::forwarded::{self, Hop};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (xff, fwd) = s.split_once('\n').unwrap_or((s, ""));
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    let trusted = ["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()];
    let got = forwarded::client_address(peer, [xff], (!fwd.is_empty()).then_some(fwd), &trusted).accountable();
    let named: Vec<Hop> = forwarded::parse_x_forwarded_for(xff).into_iter().chain(forwarded::parse_forwarded(fwd)).collect();
    assert!(got == peer || named.contains(&Hop::Ip(got)));
});
