//! Signed callbacks' building blocks: Standard Webhooks signatures, and the guard that keeps
//! callbacks off the fleet's own network (SSRF).
//!
//! # Signing
//! [`sign_headers`] gives the three Standard Webhooks headers: `webhook-id`,
//! `webhook-timestamp` and `webhook-signature`, which holds `v1,<base64 HMAC-SHA256>` of
//! `{id}.{timestamp}.{body}` once per secret, newest first, so a receiver that still
//! verifies with the previous secret keeps working during a rotation.
//!
//! The HMAC is computed here with `hmac` + `sha2` rather than by the `standardwebhooks`
//! crate: its `Webhook::sign` takes the payload as UTF-8 text and fails otherwise, which
//! would make every send fallible although the spec signs the body's bytes. The crate is a
//! dev-dependency instead, and the tests prove that it verifies what we sign.
//!
//! # The URL guard
//! A callback URL is the client's choice, so without a guard it could aim the fleet at its
//! own network (Redis, RabbitMQ's management API, the cloud metadata service). Two layers:
//! - [`check_callback_url`] when a URL is accepted (a subscription is written, a call
//!   names its own `callback_url`): the scheme, no user info, and every address the host
//!   resolves to must be public.
//! - [`guarded_client`] for sending: its DNS resolver drops non-public addresses at
//!   connection time, so a name whose answer changes after the check (DNS rebinding)
//!   still cannot reach the internal network, and it never follows redirects (a redirect
//!   could point anywhere). A URL whose host is an IP literal never reaches a resolver:
//!   check it before each send with [`check_literal_host`] (cheap, no DNS) or
//!   [`check_callback_url`].
//!
//! `allow_private` (`CALLFLEET_CALLBACKS_ALLOW_PRIVATE`, on in dev mode) lifts the address
//! checks for receivers on the same machine or network; the syntax checks stay.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;
use sha2::Sha256;

use crate::domain::subscription::parse_callback_url;
pub use crate::domain::subscription::{SecretError, SigningSecret, UrlSyntaxError};
use crate::ErrorClass;

pub const HEADER_WEBHOOK_ID: &str = "webhook-id";
pub const HEADER_WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// The environment variable that lifts the address checks (named in refusals).
pub const ALLOW_PRIVATE_ENV: &str = "CALLFLEET_CALLBACKS_ALLOW_PRIVATE";

/// How long a callback host's DNS lookup may take.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);

// --- signing ----------------------------------------------------------------------------------

/// `v1,<base64 HMAC-SHA256 of "{webhook_id}.{timestamp}.{body}">` with one secret.
pub fn signature(webhook_id: &str, timestamp: i64, body: &[u8], secret: &SigningSecret) -> String {
    use base64::Engine as _;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.key())
        .expect("HMAC accepts keys of any length");
    mac.update(webhook_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

/// The Standard Webhooks headers for `body`: `webhook-id`, `webhook-timestamp` (unix
/// seconds) and `webhook-signature` (space-separated `v1,<sig>`, one per secret, in the
/// order given: newest first). `webhook_id` must be the same on every attempt of one
/// callback (receivers deduplicate on it); `secrets` should not be empty.
pub fn sign_headers(
    webhook_id: &str,
    timestamp: i64,
    body: &[u8],
    secrets: &[SigningSecret],
) -> Vec<(&'static str, String)> {
    let signatures: Vec<String> = secrets
        .iter()
        .map(|s| signature(webhook_id, timestamp, body, s))
        .collect();
    vec![
        (HEADER_WEBHOOK_ID, webhook_id.to_owned()),
        (HEADER_WEBHOOK_TIMESTAMP, timestamp.to_string()),
        (HEADER_WEBHOOK_SIGNATURE, signatures.join(" ")),
    ]
}

// --- address classification --------------------------------------------------------------------

/// A kind of address a callback may not reach (unless private addresses are allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForbiddenRange {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, and IPv6 site-local fec0::/10 and local-use NAT64.
    Private,
    /// 169.254/16 (the cloud metadata service 169.254.169.254 among them), fe80::/10.
    LinkLocal,
    /// fc00::/7.
    UniqueLocal,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// 100.64/10, carrier-grade NAT (often a cloud provider's internal network).
    SharedAddressSpace,
    /// 224/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// 240/4 and 198.18/15 (benchmarking): not routed on the internet.
    Reserved,
}

impl ForbiddenRange {
    pub fn as_str(self) -> &'static str {
        match self {
            ForbiddenRange::Loopback => "loopback",
            ForbiddenRange::Private => "private",
            ForbiddenRange::LinkLocal => "link-local",
            ForbiddenRange::UniqueLocal => "unique-local",
            ForbiddenRange::Unspecified => "unspecified",
            ForbiddenRange::SharedAddressSpace => "shared (carrier-grade NAT)",
            ForbiddenRange::Multicast => "multicast",
            ForbiddenRange::Broadcast => "broadcast",
            ForbiddenRange::Reserved => "reserved",
        }
    }
}

impl fmt::Display for ForbiddenRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The forbidden range `ip` falls in, `None` for a public address. IPv6 forms that embed
/// an IPv4 address (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`,
/// 6to4 `2002::/16`) are judged by that IPv4 address.
pub fn forbidden_range(ip: IpAddr) -> Option<ForbiddenRange> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<ForbiddenRange> {
    let [a, b, _, _] = ip.octets();
    Some(match (a, b) {
        (0, _) => ForbiddenRange::Unspecified,
        (127, _) => ForbiddenRange::Loopback,
        (10, _) => ForbiddenRange::Private,
        (172, 16..=31) => ForbiddenRange::Private,
        (192, 168) => ForbiddenRange::Private,
        (169, 254) => ForbiddenRange::LinkLocal,
        (100, 64..=127) => ForbiddenRange::SharedAddressSpace,
        (198, 18..=19) => ForbiddenRange::Reserved,
        (224..=239, _) => ForbiddenRange::Multicast,
        _ if ip == Ipv4Addr::BROADCAST => ForbiddenRange::Broadcast,
        (240..=255, _) => ForbiddenRange::Reserved,
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<ForbiddenRange> {
    if ip.is_unspecified() {
        return Some(ForbiddenRange::Unspecified);
    }
    if ip.is_loopback() {
        return Some(ForbiddenRange::Loopback);
    }
    if let Some(v4) = embedded_v4(ip) {
        return forbidden_v4(v4);
    }
    let s = ip.segments();
    Some(match s[0] {
        0xfe80..=0xfebf => ForbiddenRange::LinkLocal,
        0xfec0..=0xfeff => ForbiddenRange::Private,
        0xfc00..=0xfdff => ForbiddenRange::UniqueLocal,
        0xff00..=0xffff => ForbiddenRange::Multicast,
        // Local-use NAT64 (RFC 8215): translates into a network of its own.
        0x0064 if s[1] == 0xff9b && s[2] == 0x0001 => ForbiddenRange::Private,
        _ => return None,
    })
}

/// The IPv4 address an IPv6 address stands for, in the forms that reach IPv4 hosts.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let last4 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible, deprecated).
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => Some(last4),
        // 64:ff9b::a.b.c.d (well-known NAT64 prefix).
        [0x0064, 0xff9b, 0, 0, 0, 0, _, _] => Some(last4),
        // 2002:aabb:ccdd::/48 (6to4).
        [0x2002, _, _, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        _ => None,
    }
}

// --- the guard ----------------------------------------------------------------------------------

/// Why a callback URL is refused. Each message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    #[error("callback URL {0}")]
    Syntax(#[from] UrlSyntaxError),
    #[error(
        "callback URL host {host} resolves to a {range} address ({addr}); callbacks only go \
         to public addresses. Set {ALLOW_PRIVATE_ENV}=true to allow it (dev mode does)"
    )]
    Forbidden {
        host: String,
        addr: IpAddr,
        range: ForbiddenRange,
    },
    #[error(
        "callback URL host {host} could not be resolved ({reason}); check the name, and that \
         this server's DNS can see it"
    )]
    Unresolvable { host: String, reason: String },
}

impl UrlRefused {
    /// A bad or forbidden URL is the client's to fix; a failed lookup may pass (a retry at
    /// delivery time can succeed).
    pub fn class(&self) -> ErrorClass {
        match self {
            UrlRefused::Syntax(_) | UrlRefused::Forbidden { .. } => ErrorClass::BadInput,
            UrlRefused::Unresolvable { .. } => ErrorClass::Retryable,
        }
    }
}

fn check_addr(host: &str, addr: IpAddr, allow_private: bool) -> Result<(), UrlRefused> {
    match forbidden_range(addr) {
        Some(range) if !allow_private => Err(UrlRefused::Forbidden {
            host: host.to_owned(),
            addr,
            range,
        }),
        _ => Ok(()),
    }
}

/// The IP a URL's host is written as, if it is an IP literal.
fn literal_ip(url: &Url) -> Option<IpAddr> {
    // http(s) URLs hold IP hosts normalised (`0x7f000001` is `127.0.0.1`), IPv6 in
    // brackets; a domain never parses as an address.
    let host = url.host_str()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse().ok()
}

/// Every address `host` resolves to (port 0: the caller's scheme decides).
async fn lookup(host: &str) -> Result<Vec<SocketAddr>, UrlRefused> {
    let unresolvable = |reason: String| UrlRefused::Unresolvable {
        host: host.to_owned(),
        reason,
    };
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((host, 0)))
            .await
            .map_err(|_| unresolvable(format!("no DNS answer within {DNS_TIMEOUT:?}")))?
            .map_err(|e| unresolvable(e.to_string()))?
            .collect();
    if addrs.is_empty() {
        return Err(unresolvable("no addresses".to_owned()));
    }
    Ok(addrs)
}

/// Checks a callback URL before it is accepted: http or https, a host, no user info, no
/// fragment, and unless `allow_private`, every address its host resolves to is public
/// ([`forbidden_range`]). An unresolvable host is refused whatever `allow_private`.
/// Returns the parsed URL.
pub async fn check_callback_url(url: &str, allow_private: bool) -> Result<Url, UrlRefused> {
    let url = parse_callback_url(url)?;
    let host = url.host_str().unwrap_or_default().to_owned();
    if let Some(ip) = literal_ip(&url) {
        check_addr(&host, ip, allow_private)?;
        return Ok(url);
    }
    for addr in lookup(&host).await? {
        check_addr(&host, addr.ip(), allow_private)?;
    }
    Ok(url)
}

/// The check to make before each send through [`guarded_client`]: a host written as an IP
/// literal is never looked up, so the client's resolver cannot refuse it. No DNS; a name
/// passes (the resolver guards it at connection time).
pub fn check_literal_host(url: &Url, allow_private: bool) -> Result<(), UrlRefused> {
    match literal_ip(url) {
        Some(ip) => check_addr(url.host_str().unwrap_or_default(), ip, allow_private),
        None => Ok(()),
    }
}

/// A DNS resolver that keeps only public addresses (all of them with `allow_private`).
#[derive(Debug, Clone, Copy)]
struct GuardedResolver {
    allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all = lookup(&host).await?;
            let first = all[0].ip();
            let allowed: Vec<SocketAddr> = all
                .into_iter()
                .filter(|a| allow_private || forbidden_range(a.ip()).is_none())
                .collect();
            if allowed.is_empty() {
                check_addr(&host, first, allow_private)?;
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The HTTP client callbacks are sent with: it follows no redirects, uses no proxy (a
/// proxy would resolve names where this guard cannot see), times out after `timeout`, and
/// its resolver drops forbidden addresses at connection time (see the module docs; IP
/// literal hosts are the caller's to check with [`check_literal_host`]).
pub fn guarded_client(
    allow_private: bool,
    timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(GuardedResolver { allow_private })
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("callfleet-callbacks/", env!("CARGO_PKG_VERSION")))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn secret(s: &str) -> SigningSecret {
        SigningSecret::parse(s).expect("valid secret")
    }

    #[test]
    fn signs_the_standard_webhooks_test_vector() {
        let headers = sign_headers(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
            &[secret(SPEC_SECRET)],
        );
        assert_eq!(
            headers,
            vec![
                ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".to_owned()),
                ("webhook-timestamp", "1614265330".to_owned()),
                (
                    "webhook-signature",
                    "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn matches_the_reference_crate_and_verifies_with_it() {
        // The reference implementation's own test vector.
        let reference = standardwebhooks::Webhook::new("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD")
            .expect("secret");
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let ours = signature(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1_649_367_553,
            body,
            &secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"),
        );
        assert_eq!(
            ours,
            reference
                .sign("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1_649_367_553, body)
                .expect("signs")
        );
        assert_eq!(ours, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");

        // A receiver verifying with either secret of a rotation accepts our headers.
        let old = SigningSecret::generate();
        let new = SigningSecret::generate();
        let now = chrono::Utc::now().timestamp();
        let headers = sign_headers("msg_rotation", now, body, &[new.clone(), old.clone()]);
        let mut map = http::HeaderMap::new();
        for (name, value) in &headers {
            map.insert(*name, value.parse().expect("header value"));
        }
        let signatures = &headers[2].1;
        assert_eq!(signatures.split(' ').count(), 2);
        assert!(signatures.starts_with(&signature("msg_rotation", now, body, &new)));
        for s in [&old, &new] {
            standardwebhooks::Webhook::new(s.as_str())
                .expect("secret")
                .verify(body, &map)
                .expect("verifies");
        }
        standardwebhooks::Webhook::new(SigningSecret::generate().as_str())
            .expect("secret")
            .verify(body, &map)
            .expect_err("another secret does not verify");
    }

    #[test]
    fn classifies_addresses() {
        use ForbiddenRange::*;
        let table: &[(&str, Option<ForbiddenRange>)] = &[
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("93.184.216.34", None),
            ("172.15.255.255", None),
            ("172.32.0.1", None),
            ("100.63.255.255", None),
            ("100.128.0.0", None),
            ("192.169.0.1", None),
            ("223.255.255.255", None),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("10.0.0.5", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("169.254.169.254", Some(LinkLocal)),
            ("169.254.0.1", Some(LinkLocal)),
            ("100.64.0.1", Some(SharedAddressSpace)),
            ("100.127.255.255", Some(SharedAddressSpace)),
            ("198.18.0.1", Some(Reserved)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("240.0.0.1", Some(Reserved)),
            // IPv6.
            ("2606:4700:4700::1111", None),
            ("2001:4860:4860::8888", None),
            ("::", Some(Unspecified)),
            ("::1", Some(Loopback)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("fec0::1", Some(Private)),
            ("fc00::1", Some(UniqueLocal)),
            ("fd12:3456:789a::1", Some(UniqueLocal)),
            ("ff02::1", Some(Multicast)),
            ("64:ff9b:1::a00:1", Some(Private)),
            // IPv6 forms of IPv4 addresses are judged as those.
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:10.0.0.5", Some(Private)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some(Loopback)),
            ("::10.1.2.3", Some(Private)),
            ("64:ff9b::192.168.0.1", Some(Private)),
            ("64:ff9b::8.8.8.8", None),
            ("2002:a00:1::1", Some(Private)),
            ("2002:808:808::1", None),
        ];
        for (text, expected) in table {
            let ip: IpAddr = text.parse().expect(text);
            assert_eq!(forbidden_range(ip), *expected, "{text}");
        }
    }

    #[tokio::test]
    async fn refuses_bad_schemes_and_user_info() {
        for (url, why) in [
            ("ftp://example.com/x", "must use http or https"),
            (
                "gopher://127.0.0.1:6379/_FLUSHALL",
                "must use http or https",
            ),
            ("file:///etc/passwd", "must use http or https"),
            ("https://user:pw@example.com/", "user name or password"),
            ("not a url", "valid absolute URL"),
            ("https://example.com/#x", "fragment"),
        ] {
            let refused = check_callback_url(url, true).await.expect_err(url);
            assert!(
                matches!(refused, UrlRefused::Syntax(_)),
                "{url}: {refused:?}"
            );
            assert!(refused.to_string().contains(why), "{url}: {refused}");
            assert_eq!(refused.class(), ErrorClass::BadInput);
        }
    }

    #[tokio::test]
    async fn refuses_private_literals_unless_allowed() {
        for url in [
            "http://10.0.0.5/hook",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:8080/",
            "http://[::ffff:192.168.0.1]/",
            "http://0x7f000001/",
            "http://2130706433/",
        ] {
            let refused = check_callback_url(url, false).await.expect_err(url);
            assert!(
                matches!(refused, UrlRefused::Forbidden { .. }),
                "{url}: {refused:?}"
            );
            let parsed = Url::parse(url).expect("url");
            assert_eq!(check_literal_host(&parsed, false), Err(refused));
            assert!(check_callback_url(url, true).await.is_ok(), "{url}");
            assert!(check_literal_host(&parsed, true).is_ok());
        }
        let refused = check_callback_url("http://10.0.0.5/hook", false)
            .await
            .expect_err("private");
        assert_eq!(
            refused.to_string(),
            "callback URL host 10.0.0.5 resolves to a private address (10.0.0.5); callbacks \
             only go to public addresses. Set CALLFLEET_CALLBACKS_ALLOW_PRIVATE=true to allow \
             it (dev mode does)"
        );
        // A public literal passes, and a name is left to the resolver.
        assert!(check_callback_url("https://93.184.216.34/x", false)
            .await
            .is_ok());
        let named = Url::parse("https://example.com/").expect("url");
        assert!(check_literal_host(&named, false).is_ok());
    }

    #[tokio::test]
    async fn localhost_is_refused_unless_allowed() {
        let refused = check_callback_url("http://localhost:8080/hook", false)
            .await
            .expect_err("localhost");
        match &refused {
            UrlRefused::Forbidden { host, range, .. } => {
                assert_eq!(host, "localhost");
                assert_eq!(*range, ForbiddenRange::Loopback);
            }
            other => panic!("expected Forbidden, got {other:?}"),
        }
        assert!(refused.to_string().contains(ALLOW_PRIVATE_ENV));
        let url = check_callback_url("http://localhost:8080/hook", true)
            .await
            .expect("allowed");
        assert_eq!(url.as_str(), "http://localhost:8080/hook");
    }

    #[tokio::test]
    async fn unresolvable_hosts_have_their_own_refusal() {
        // `.invalid` never resolves (RFC 6761).
        let refused = check_callback_url("https://no-such-host.invalid/hook", true)
            .await
            .expect_err("unresolvable");
        assert!(
            matches!(&refused, UrlRefused::Unresolvable { host, .. } if host == "no-such-host.invalid"),
            "{refused:?}"
        );
        assert_eq!(refused.class(), ErrorClass::Retryable);
    }

    /// A local HTTP server answering 200 to one request, and its port.
    async fn one_shot_server() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            }
        });
        port
    }

    #[tokio::test]
    async fn the_client_cannot_reach_a_name_that_resolves_privately() {
        let port = one_shot_server().await;
        let url = format!("http://localhost:{port}/hook");
        let guarded = guarded_client(false, Duration::from_secs(5)).expect("client");
        let err = guarded.post(&url).send().await.expect_err("refused");
        let mut chain = String::new();
        let mut source: Option<&dyn std::error::Error> = Some(&err);
        while let Some(e) = source {
            chain.push_str(&format!("{e}: "));
            source = e.source();
        }
        assert!(chain.contains("loopback"), "{chain}");

        let open = guarded_client(true, Duration::from_secs(5)).expect("client");
        let answer = open.post(&url).send().await.expect("allowed");
        assert_eq!(answer.status(), 200);
    }

    #[tokio::test]
    async fn the_client_does_not_follow_redirects() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            if let Ok((mut socket, _)) = listener.accept().await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 307 Temporary Redirect\r\nlocation: http://169.254.169.254/\r\n\
                          content-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
            }
        });
        let client = guarded_client(true, Duration::from_secs(5)).expect("client");
        let answer = client
            .post(format!("http://127.0.0.1:{port}/hook"))
            .send()
            .await
            .expect("answered");
        assert_eq!(
            answer.status(),
            307,
            "the redirect is the answer, not followed"
        );
    }
}
