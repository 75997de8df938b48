//! The one signature algorithm bearer tokens use, HS256, given to `jsonwebtoken` as its
//! crypto provider.
//!
//! Why not a built-in provider: `jsonwebtoken`'s `rust_crypto` backend links every
//! algorithm it supports, `rsa` among them, which carries an unfixed timing advisory
//! (RUSTSEC-2023-0071) that `cargo deny` rightly refuses; its `aws_lc_rs` backend builds a
//! C library for algorithms the shop never uses. This provider is RustCrypto's `hmac` over
//! `sha2` for HS256 and refuses every other algorithm, so a token naming another one can
//! never reach a verifier.

use hmac::{Hmac, Mac};
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey,
    crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils},
    errors::{ErrorKind, Result},
    signature::{self, Signer, Verifier},
};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

struct Hs256(HmacSha256);

impl Hs256 {
    fn new(secret: &[u8]) -> Result<Self> {
        HmacSha256::new_from_slice(secret)
            .map(Self)
            .map_err(|_| ErrorKind::InvalidKeyFormat.into())
    }

    fn mac(&self, msg: &[u8]) -> HmacSha256 {
        let mut mac = self.0.clone();
        mac.update(msg);
        mac
    }
}

impl Signer<Vec<u8>> for Hs256 {
    fn try_sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
        Ok(self.mac(msg).finalize().into_bytes().to_vec())
    }
}

impl JwtSigner for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl Verifier<Vec<u8>> for Hs256 {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> std::result::Result<(), signature::Error> {
        // Constant time: `verify_slice` compares without an early exit.
        self.mac(msg)
            .verify_slice(sig)
            .map_err(signature::Error::from_source)
    }
}

impl JwtVerifier for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: |alg, key: &EncodingKey| match alg {
        Algorithm::HS256 => Ok(Box::new(Hs256::new(key.as_bytes())?)),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    },
    verifier_factory: |alg, key: &DecodingKey| match alg {
        Algorithm::HS256 => Ok(Box::new(Hs256::new(key.try_get_as_bytes()?)?)),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    },
    key_utils: KeyUtils::new_unimplemented(),
};

/// Makes HS256 the process's `jsonwebtoken` provider. Idempotent; called before any token is
/// signed or verified.
pub(super) fn install() {
    // `Err` means it is installed already (by an earlier call).
    let _ = PROVIDER.install_default();
}
