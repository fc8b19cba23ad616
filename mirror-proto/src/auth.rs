//! Mutual authentication with a shared secret: each side sends a random
//! challenge, and the other answers with HMAC-SHA256 over a fixed label, the
//! challenge and its own node name. Binding the answer to the responder's
//! name means a challenge cannot be reflected back to the side that sent it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::message::{MAC_BYTES, NONCE_BYTES};

const LABEL: &[u8] = b"blkmirror-auth-v1";

fn mac(secret: &[u8], nonce: &[u8; NONCE_BYTES], responder: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(LABEL);
    mac.update(nonce);
    mac.update(responder.as_bytes());
    mac
}

/// The answer `responder` gives to `nonce`.
pub fn respond(secret: &[u8], nonce: &[u8; NONCE_BYTES], responder: &str) -> [u8; MAC_BYTES] {
    mac(secret, nonce, responder).finalize().into_bytes().into()
}

/// Checks an answer in constant time.
pub fn verify(
    secret: &[u8],
    nonce: &[u8; NONCE_BYTES],
    responder: &str,
    answer: &[u8; MAC_BYTES],
) -> bool {
    mac(secret, nonce, responder).verify_slice(answer).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_secret_passes_and_everything_else_fails() {
        let nonce = [7u8; NONCE_BYTES];
        let answer = respond(b"s3cret", &nonce, "beta");
        assert!(verify(b"s3cret", &nonce, "beta", &answer));
        assert!(!verify(b"other", &nonce, "beta", &answer), "wrong secret");
        assert!(
            !verify(b"s3cret", &[8; NONCE_BYTES], "beta", &answer),
            "other challenge"
        );
        assert!(
            !verify(b"s3cret", &nonce, "alpha", &answer),
            "reflected to its sender"
        );
    }
}
