//! The client's address behind proxies: one parser for `X-Forwarded-For` and `Forwarded` (RFC 7239).
//!
//! Policy:
//! - Headers count only when the peer is a trusted proxy; otherwise the client is the peer.
//! - Both headers are read. When both are present they must name the same hops, or neither is believed
//!   (an attacker can add the header a proxy does not maintain).
//! - The chain is walked from the nearest hop outwards: trusted proxies are skipped, the first untrusted
//!   address is the client. A hop that cannot be parsed (`unknown`, an obfuscated identifier, garbage, a
//!   `Forwarded` element without `for=`) stops the walk. The client is then *unresolved*: it passes no IP
//!   allow-list (even one that names the proxies' network), and its failures are charged to the last
//!   trusted proxy that was reached (fail closed): never an address the client could have chosen.
//! - Node forms: `192.0.2.1`, `192.0.2.1:8080`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:443`; in
//!   `Forwarded` also quoted (`for="[2001:db8::1]:443"`) and with obfuscated ports (`:_p1`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::limits::ip_allowed;

/// Most hops read from the headers; a longer chain ends in an unknown hop.
pub const MAX_HOPS: usize = 64;

/// One hop of a forwarding chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    Ip(IpAddr),
    /// `unknown`, an obfuscated identifier, or anything that is not an address.
    Unknown,
}

/// An RFC 7239 node (or an `X-Forwarded-For` entry): an address with an optional port.
pub fn parse_node(s: &str) -> Hop {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else { return Hop::Unknown };
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(valid_port);
        return match inside.parse::<Ipv6Addr>() {
            Ok(ip) if port_ok => Hop::Ip(IpAddr::V6(ip)),
            _ => Hop::Unknown,
        };
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Hop::Ip(ip);
    }
    match s.rsplit_once(':') {
        Some((host, port)) if valid_port(port) => match host.parse::<Ipv4Addr>() {
            Ok(ip) => Hop::Ip(IpAddr::V4(ip)),
            Err(_) => Hop::Unknown,
        },
        _ => Hop::Unknown,
    }
}

/// A port: 1–5 digits up to 65535, or an obfuscated port (`_` followed by ALPHA / DIGIT / `.` `_` `-`).
fn valid_port(p: &str) -> bool {
    if let Some(obf) = p.strip_prefix('_') {
        return !obf.is_empty() && obf.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    }
    !p.is_empty()
        && p.len() <= 5
        && p.bytes().all(|b| b.is_ascii_digit())
        && p.parse::<u32>().is_ok_and(|n| n <= 65535)
}

/// Splits on `sep` outside double-quoted strings (with `\` escapes inside them).
fn split_unquoted(s: &str, sep: u8) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, b) in s.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == sep && !quoted {
            out.push(&s[start..i]);
            start = i + 1;
        }
    }
    out.push(&s[start..]);
    out
}

/// An RFC 7230 quoted-string's content, or the token itself.
fn unquote(v: &str) -> Option<String> {
    let Some(inner) = v.strip_prefix('"') else { return Some(v.to_string()) };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// The hops of one `X-Forwarded-For` value, left (farthest) to right (nearest).
pub fn parse_x_forwarded_for(value: &str) -> Vec<Hop> {
    value.split(',').map(parse_node).collect()
}

/// The `for=` hops of one `Forwarded` value, left to right. An element without exactly one `for`
/// parameter, or with a malformed one, is an unknown hop.
pub fn parse_forwarded(value: &str) -> Vec<Hop> {
    split_unquoted(value, b',')
        .into_iter()
        .map(|element| {
            let mut found: Option<Hop> = None;
            for pair in split_unquoted(element, b';') {
                let Some((k, v)) = pair.split_once('=') else {
                    if pair.trim().is_empty() {
                        continue;
                    }
                    return Hop::Unknown;
                };
                if !k.trim().eq_ignore_ascii_case("for") {
                    continue;
                }
                if found.is_some() {
                    return Hop::Unknown;
                }
                found = Some(unquote(v.trim()).map_or(Hop::Unknown, |node| parse_node(&node)));
            }
            found.unwrap_or(Hop::Unknown)
        })
        .collect()
}

fn chain<'a>(values: impl IntoIterator<Item = &'a str>, parse: fn(&str) -> Vec<Hop>) -> Option<Vec<Hop>> {
    let mut hops: Vec<Hop> = Vec::new();
    let mut any = false;
    for v in values {
        any = true;
        hops.extend(parse(v));
    }
    if hops.len() > MAX_HOPS {
        // Keep the nearest hops; the walk stops at the unknown one beyond them.
        let cut = hops.len() - MAX_HOPS;
        hops.drain(..cut);
        hops.insert(0, Hop::Unknown);
    }
    any.then_some(hops)
}

/// Who the client is, as far as it can be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddress {
    /// The client's address: the peer, or the address trusted proxies named.
    Known(IpAddr),
    /// The headers could not be believed (they disagree, or a hop is not an address). The address is the
    /// last trusted proxy reached: charge failures to it, but never let it pass an allow-list.
    Unresolved(IpAddr),
}

impl ClientAddress {
    /// The address to match against IP allow-lists: none when unresolved.
    pub fn known(self) -> Option<IpAddr> {
        match self {
            ClientAddress::Known(ip) => Some(ip),
            ClientAddress::Unresolved(_) => None,
        }
    }

    /// The address that answers for this request's failures.
    pub fn accountable(self) -> IpAddr {
        match self {
            ClientAddress::Known(ip) | ClientAddress::Unresolved(ip) => ip,
        }
    }
}

/// The client's address: `peer` itself, or, when `peer` is a trusted proxy, the address the forwarding
/// headers name (see the module's policy). `x_forwarded_for` and `forwarded` are every value of each
/// header, in the order received.
pub fn client_address<'a>(
    peer: IpAddr,
    x_forwarded_for: impl IntoIterator<Item = &'a str>,
    forwarded: impl IntoIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> ClientAddress {
    if trusted.is_empty() || !ip_allowed(trusted, peer) {
        return ClientAddress::Known(peer);
    }
    let hops = match (chain(x_forwarded_for, parse_x_forwarded_for), chain(forwarded, parse_forwarded)) {
        (None, None) => return ClientAddress::Known(peer),
        (Some(x), None) => x,
        (None, Some(f)) => f,
        (Some(x), Some(f)) if x == f => x,
        // The headers disagree: one of them was written by the client.
        (Some(_), Some(_)) => return ClientAddress::Unresolved(peer),
    };
    let mut nearest_trusted = peer;
    for hop in hops.iter().rev() {
        match *hop {
            Hop::Ip(ip) if ip_allowed(trusted, ip) => nearest_trusted = ip,
            Hop::Ip(ip) => return ClientAddress::Known(ip),
            Hop::Unknown => return ClientAddress::Unresolved(nearest_trusted),
        }
    }
    // Every hop is a trusted proxy: the farthest one is the client.
    ClientAddress::Known(nearest_trusted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn node_forms() {
        let cases: &[(&str, Hop)] = &[
            ("192.0.2.1", Hop::Ip(ip("192.0.2.1"))),
            (" 192.0.2.1 ", Hop::Ip(ip("192.0.2.1"))),
            ("192.0.2.1:8080", Hop::Ip(ip("192.0.2.1"))),
            ("192.0.2.1:_p1", Hop::Ip(ip("192.0.2.1"))),
            ("2001:db8::1", Hop::Ip(ip("2001:db8::1"))),
            ("[2001:db8::1]", Hop::Ip(ip("2001:db8::1"))),
            ("[2001:db8::1]:443", Hop::Ip(ip("2001:db8::1"))),
            ("::ffff:192.0.2.1", Hop::Ip(ip("::ffff:192.0.2.1"))),
            ("unknown", Hop::Unknown),
            ("_hidden", Hop::Unknown),
            ("_hidden:80", Hop::Unknown),
            ("192.0.2.1:99999", Hop::Unknown),
            ("192.0.2.1:", Hop::Unknown),
            ("[2001:db8::1", Hop::Unknown),
            ("[2001:db8::1]x", Hop::Unknown),
            ("[192.0.2.1]", Hop::Unknown),
            ("example.com", Hop::Unknown),
            ("", Hop::Unknown),
        ];
        for (input, want) in cases {
            assert_eq!(parse_node(input), *want, "{input:?}");
        }
    }

    #[test]
    fn forwarded_header_forms() {
        let cases: &[(&str, Vec<Hop>)] = &[
            ("for=192.0.2.60;proto=http;by=203.0.113.43", vec![Hop::Ip(ip("192.0.2.60"))]),
            ("for=\"[2001:db8:cafe::17]:4711\"", vec![Hop::Ip(ip("2001:db8:cafe::17"))]),
            (
                "For=\"192.0.2.1:80\", for=198.51.100.17",
                vec![Hop::Ip(ip("192.0.2.1")), Hop::Ip(ip("198.51.100.17"))],
            ),
            ("for=unknown, for=198.51.100.17", vec![Hop::Unknown, Hop::Ip(ip("198.51.100.17"))]),
            ("for=_gazonk", vec![Hop::Unknown]),
            ("proto=https", vec![Hop::Unknown]),
            ("for=192.0.2.1;for=192.0.2.2", vec![Hop::Unknown]),
            ("for=\"192.0.2.1", vec![Hop::Unknown]),
            ("for=\"a,b\";proto=x, for=192.0.2.9", vec![Hop::Unknown, Hop::Ip(ip("192.0.2.9"))]),
            ("garbage", vec![Hop::Unknown]),
        ];
        for (input, want) in cases {
            assert_eq!(&parse_forwarded(input), want, "{input:?}");
        }
    }

    #[test]
    fn client_address_table() {
        use ClientAddress::{Known, Unresolved};
        let trusted: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let proxy = ip("127.0.0.1");
        let outsider = ip("192.0.2.9");
        #[allow(clippy::type_complexity)]
        let cases: &[(IpAddr, &[&str], &[&str], ClientAddress, &str)] = &[
            // (peer, X-Forwarded-For values, Forwarded values, expected, why)
            (outsider, &["198.51.100.1"], &[], Known(outsider), "untrusted peer: headers ignored"),
            (proxy, &[], &[], Known(proxy), "trusted peer, no headers"),
            (
                proxy,
                &["198.51.100.1, 203.0.113.5, 10.1.1.1"],
                &[],
                Known(ip("203.0.113.5")),
                "right-most untrusted",
            ),
            (proxy, &["198.51.100.1", "203.0.113.5"], &[], Known(ip("203.0.113.5")), "several header lines"),
            (proxy, &["203.0.113.5:4711"], &[], Known(ip("203.0.113.5")), "v4 with port"),
            (proxy, &["[2001:db8::7]:443"], &[], Known(ip("2001:db8::7")), "bracketed v6 with port"),
            (proxy, &["10.2.2.2, 10.1.1.1"], &[], Known(ip("10.2.2.2")), "all trusted: the farthest"),
            (proxy, &["198.51.100.1, garbage"], &[], Unresolved(proxy), "unparsable nearest hop"),
            (
                proxy,
                &["garbage, 198.51.100.1"],
                &[],
                Known(ip("198.51.100.1")),
                "client garbage left of the proxy's hop",
            ),
            (
                proxy,
                &["198.51.100.1, unknown, 10.1.1.1"],
                &[],
                Unresolved(ip("10.1.1.1")),
                "unknown hop after a trusted one",
            ),
            (
                proxy,
                &[],
                &["for=\"[2001:db8::7]:4711\";proto=https"],
                Known(ip("2001:db8::7")),
                "Forwarded alone",
            ),
            (proxy, &[], &["for=_hidden"], Unresolved(proxy), "obfuscated identifier"),
            (proxy, &["203.0.113.5"], &["for=203.0.113.5"], Known(ip("203.0.113.5")), "both headers agree"),
            (proxy, &["203.0.113.5"], &["for=198.51.100.66"], Unresolved(proxy), "headers disagree"),
            (
                proxy,
                &["198.51.100.66"],
                &["for=\"[2001:db8::1]:1\""],
                Unresolved(proxy),
                "disagree, other forms",
            ),
        ];
        for (peer, xff, fwd, want, why) in cases {
            let got = client_address(*peer, xff.iter().copied(), fwd.iter().copied(), &trusted);
            assert_eq!(got, *want, "{why}");
        }
        assert_eq!(client_address(proxy, ["198.51.100.1"], [], &[]), Known(proxy), "no proxies configured");
        assert_eq!(Unresolved(proxy).known(), None, "an unresolved client passes no allow-list");
        assert_eq!(Unresolved(proxy).accountable(), proxy);
    }

    #[test]
    fn long_chains_end_in_an_unknown_hop() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut hops = vec!["198.51.100.1".to_string()];
        hops.extend((0..MAX_HOPS).map(|i| format!("10.0.0.{}", i % 250)));
        let v = hops.join(",");
        assert_eq!(
            client_address(ip("10.9.9.9"), [v.as_str()], [], &trusted),
            ClientAddress::Unresolved(ip("10.0.0.0"))
        );
    }
}
