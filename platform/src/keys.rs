//! Key material: one convention for every secret key the shop holds (the bearer-token
//! keys now, the audit chain's keys next).
//!
//! Why one convention: keys that live in the database protect nothing against whoever can
//! write the database, and keys built into the binary protect nothing at all. Every key set
//! is a [`Keyring`]: named keys (`kid`), read from the environment (`<NAME>_KEYS`) or from a
//! file outside the database (`<NAME>_KEYS_FILE`), never defaulted. The first key signs; every
//! key verifies, so a rotation is: put the new key first, keep the old one until nothing it
//! signed is still accepted, then drop it. `docs/security.md` states the procedure.
//!
//! The format is one key per line (or per comma in the environment variable):
//! `kid=secret`, where `kid` is 1 to 64 of `[A-Za-z0-9._-]` and the secret is at least
//! [`MIN_SECRET_BYTES`] bytes (scripts generate 64 hex characters). Blank lines and lines
//! starting with `#` are ignored.

use std::{fmt, path::Path};

/// Shortest secret accepted: 256 bits when written as 64 hex characters, and never shorter
/// than the output of the HMAC-SHA-256 it keys.
pub const MIN_SECRET_BYTES: usize = 32;

/// One named secret. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    pub kid: String,
    secret: Vec<u8>,
}

impl Key {
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Named keys, the first one active (signs), all of them verifying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<Key>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{name}: no key configured; set {name}_KEYS or {name}_KEYS_FILE ({hint})")]
    Missing { name: String, hint: String },
    #[error("{name}: set either {name}_KEYS or {name}_KEYS_FILE, not both")]
    Both { name: String },
    #[error("{name}: reading {path}: {reason}")]
    Unreadable {
        name: String,
        path: String,
        reason: String,
    },
    #[error("{name}: line {line}: {reason}")]
    Invalid {
        name: String,
        line: usize,
        reason: String,
    },
    #[error("{name}: the key set is empty")]
    Empty { name: String },
}

impl Keyring {
    /// Parses a key file: one `kid=secret` per line. `name` (e.g. `JWT`) only labels errors,
    /// which never quote a kid or a secret (a line pasted wrong may have a secret where the
    /// kid should be).
    pub fn parse(name: &str, text: &str) -> Result<Self, KeyError> {
        Self::parse_entries(name, text.split('\n'))
    }

    /// Parses the environment variable's form: entries separated by commas (or newlines).
    pub fn parse_inline(name: &str, text: &str) -> Result<Self, KeyError> {
        Self::parse_entries(name, text.split(['\n', ',']))
    }

    fn parse_entries<'t>(
        name: &str,
        entries: impl Iterator<Item = &'t str>,
    ) -> Result<Self, KeyError> {
        let invalid = |line: usize, reason: String| KeyError::Invalid {
            name: name.to_owned(),
            line,
            reason,
        };
        let mut keys: Vec<Key> = Vec::new();
        for (i, entry) in entries.enumerate() {
            let entry = entry.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let (kid, secret) = entry
                .split_once('=')
                .ok_or_else(|| invalid(i + 1, "expected `kid=secret`".into()))?;
            let kid = kid.trim();
            let secret = secret.trim();
            let kid_ok = (1..=64).contains(&kid.len())
                && kid
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !kid_ok {
                return Err(invalid(
                    i + 1,
                    "the kid must be 1 to 64 of A-Z a-z 0-9 . _ -".into(),
                ));
            }
            if secret.len() < MIN_SECRET_BYTES {
                return Err(invalid(
                    i + 1,
                    format!("the secret is shorter than {MIN_SECRET_BYTES} bytes"),
                ));
            }
            if keys.iter().any(|k| k.kid == kid) {
                return Err(invalid(
                    i + 1,
                    "its kid appears on an earlier line too".into(),
                ));
            }
            keys.push(Key {
                kid: kid.to_owned(),
                secret: secret.as_bytes().to_vec(),
            });
        }
        if keys.is_empty() {
            return Err(KeyError::Empty {
                name: name.to_owned(),
            });
        }
        Ok(Self { keys })
    }

    /// The keyring configured by `<NAME>_KEYS` (inline) or `<NAME>_KEYS_FILE`, or `None`
    /// when neither is set.
    pub fn configured(
        name: &str,
        inline: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Option<Self>, KeyError> {
        match (inline, file) {
            (Some(_), Some(_)) => Err(KeyError::Both {
                name: name.to_owned(),
            }),
            (Some(text), None) => Self::parse_inline(name, text).map(Some),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| KeyError::Unreadable {
                    name: name.to_owned(),
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                warn_if_readable_by_others(name, path);
                Self::parse(name, &text).map(Some)
            }
            (None, None) => Ok(None),
        }
    }

    /// A keyring of one random key that nothing outside this process knows (development
    /// mode without configured keys).
    pub fn ephemeral(kid: &str) -> Self {
        let secret: [u8; 32] = rand::random();
        Self {
            keys: vec![Key {
                kid: kid.to_owned(),
                secret: hex::encode(secret).into_bytes(),
            }],
        }
    }

    /// The key that signs.
    pub fn active(&self) -> &Key {
        &self.keys[0]
    }

    /// The key named `kid`, if this ring holds it.
    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.kid.as_str())
    }

    /// `(kid, secret)` of every key, the signing one first (for libraries that take raw keys).
    pub fn entries(&self) -> Vec<(String, Vec<u8>)> {
        self.keys
            .iter()
            .map(|k| (k.kid.clone(), k.secret.clone()))
            .collect()
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(name: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            "{name} key file is readable by other users; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &str, _: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn the_first_key_signs_and_every_key_is_found_by_kid() {
        let ring =
            Keyring::parse("JWT", &format!("# rotated 2026-11\nnew={B}\n\nold={A}\n")).unwrap();
        assert_eq!(ring.active().kid, "new");
        assert_eq!(ring.get("old").unwrap().secret(), A.as_bytes());
        assert_eq!(ring.kids().collect::<Vec<_>>(), ["new", "old"]);
        let inline = Keyring::parse_inline("JWT", &format!("new={B},old={A}")).unwrap();
        assert_eq!(inline, ring);
    }

    #[test]
    fn bad_key_sets_are_refused_without_quoting_the_secret() {
        let short = "tooshort-secret";
        for (text, expect) in [
            ("", "empty"),
            ("# nothing\n", "empty"),
            (A, "kid=secret"),
            (&format!("k={short}"), "shorter than 32"),
            (&format!("bad kid={A}"), "kid must be"),
            (&format!("k={A}\nk={B}"), "earlier line"),
            // A base64 secret pasted without its kid: `=` padding makes it look like one.
            (&format!("{}=", &A[..30]), "shorter than 32"),
        ] {
            let e = Keyring::parse("JWT", text).unwrap_err().to_string();
            assert!(e.contains(expect), "{text:?}: {e}");
            assert!(!e.contains(short) && !e.contains(&A[..30]), "{e}");
        }
        let debug = format!("{:?}", Keyring::parse("JWT", &format!("k={A}")).unwrap());
        assert!(!debug.contains(A), "{debug}");
    }

    #[test]
    fn keys_come_from_one_source() {
        assert_eq!(Keyring::configured("JWT", None, None), Ok(None));
        assert!(matches!(
            Keyring::configured("JWT", Some("x"), Some(Path::new("/x"))),
            Err(KeyError::Both { .. })
        ));
        let dir = std::env::temp_dir().join(format!("keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("jwt.keys");
        std::fs::write(&file, format!("k1={A}\n")).unwrap();
        let ring = Keyring::configured("JWT", None, Some(&file))
            .unwrap()
            .unwrap();
        assert_eq!(ring.active().kid, "k1");
        assert!(matches!(
            Keyring::configured("JWT", None, Some(&dir.join("missing"))),
            Err(KeyError::Unreadable { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
        let a = Keyring::ephemeral("dev");
        let b = Keyring::ephemeral("dev");
        assert_ne!(a.active().secret(), b.active().secret());
    }
}
