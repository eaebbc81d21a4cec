//! Serde helpers shared by the sections.

use serde::{Deserialize, Deserializer};

/// Read `null` as the type's default, as for an absent field (Firecracker writes `null` for
/// optional sections and fields it does not use: `"logger": null`, `"is_read_only": null`).
/// Use with `#[serde(default, deserialize_with = "null_default")]`.
pub(super) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
