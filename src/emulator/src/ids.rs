//! LiveKit-style ids: a prefix plus 12 base62 characters (protocol `utils/guid`).

use rand::Rng;

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

pub fn guid(prefix: &str) -> String {
    let mut rng = rand::rng();
    let suffix: String = (0..12)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{suffix}")
}

pub fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_look_like_livekit_ids() {
        let id = super::guid("EV_");
        assert_eq!(id.len(), 15);
        assert!(id.starts_with("EV_"));
        assert!(id[3..].chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
