//! Human sizes: `4096`, `64MiB`, `1GiB`, `10G` (binary units throughout).

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {0:?}: use bytes or a number with KiB, MiB, GiB or TiB (e.g. 64MiB)")]
pub struct SizeError(String);

pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| SizeError(text.into()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "ki" | "kib" => 10,
        "m" | "mi" | "mib" => 20,
        "g" | "gi" | "gib" => 30,
        "t" | "ti" | "tib" => 40,
        _ => return Err(SizeError(text.into())),
    };
    number.checked_mul(1 << shift).ok_or_else(|| SizeError(text.into()))
}

/// Bytes in the largest binary unit they reach: whole when exact, else
/// with one decimal (`64MiB`, `1.5GiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let unit = (0..UNITS.len()).rev().find(|u| bytes >= 1 << (10 * u)).unwrap_or(0);
    let scale = 1u64 << (10 * unit);
    if bytes.is_multiple_of(scale) {
        format!("{}{}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.1}{}", bytes as f64 / scale as f64, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5PB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert_eq!(format_size(64 << 20), "64MiB");
        assert_eq!(format_size(1536 << 20), "1.5GiB");
        assert_eq!(format_size(4097), "4.0KiB");
        assert_eq!(format_size(0), "0B");
    }
}
