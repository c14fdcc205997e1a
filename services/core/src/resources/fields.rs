//! Field checks more than one resource's input uses: list lengths, TLS version ranges, durations
//! in seconds. Every error names the field as the Admin API spells it.

use tokenfleet_domain::{TlsVersion, Valid, ValidationError};

use crate::ops::choice::Choice;

/// Longest SMTP/fetch timeout or interval, seconds.
pub const MAX_SECONDS: u32 = 86_400;

/// At most `max` entries.
pub fn list_len(field: &str, len: usize, max: usize) -> Valid {
    if len > max {
        return Err(ValidationError::new(
            field,
            format!("at most {max} entries, got {len}"),
        ));
    }
    Ok(())
}

/// A TLS version range (`{prefix}.tls_min_version`, `{prefix}.tls_max_version`); min must not
/// exceed max.
pub fn tls_range(
    prefix: &str,
    min: Choice<TlsVersion>,
    max: Choice<TlsVersion>,
) -> Valid<(Option<TlsVersion>, Option<TlsVersion>)> {
    let lo = min.optional(&format!("{prefix}.tls_min_version"))?;
    let hi = max.optional(&format!("{prefix}.tls_max_version"))?;
    if let (Some(lo), Some(hi)) = (lo, hi)
        && lo == TlsVersion::V1_3
        && hi == TlsVersion::V1_2
    {
        return Err(ValidationError::new(
            format!("{prefix}.tls_max_version"),
            "must not be lower than tls_min_version",
        ));
    }
    Ok((lo, hi))
}

/// `min`–[`MAX_SECONDS`] seconds; 0 means `default`.
pub fn seconds(field: &str, value: u32, default: u32, min: u32) -> Valid<u32> {
    match value {
        0 => Ok(default),
        v if v < min || v > MAX_SECONDS => Err(ValidationError::new(
            field,
            format!("must be {min}-{MAX_SECONDS} seconds (0 = default), got {v}"),
        )),
        v => Ok(v),
    }
}
