//! Byte counts as people write them, in two dialects:
//! - Ballast's flags ([`parse_size`]): `4096`, `64MiB`, `10G`, `512k`,
//!   `2tb`: K, M, G and T with or without `i` and `B`, all powers of 1024;
//! - Kubernetes quantities ([`parse_quantity`]), as StorageClass parameters
//!   carry them: `500M` (powers of 1000), `1Gi` (powers of 1024).

/// Why a size did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("invalid size {text:?}: {expected}")]
    Invalid { text: String, expected: &'static str },
    #[error("size {0:?} is too large")]
    TooLarge(String),
}

const FLAG_UNITS: &str = "use bytes or a number with KiB, MiB, GiB or TiB (e.g. 64MiB)";
const QUANTITY_UNITS: &str = "use bytes or a quantity such as 500M, 1G, 512Mi or 1Gi";

/// A size in Ballast's flags, every unit binary.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let (number, unit) = split(text, FLAG_UNITS)?;
    let shift = match unit.to_ascii_lowercase().trim_end_matches('b').trim_end_matches('i') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(invalid(text, FLAG_UNITS)),
    };
    scale(text, number, 1 << shift)
}

/// A Kubernetes quantity: `k`/`K`, `M`, `G`, `T` are powers of 1000; `Ki`,
/// `Mi`, `Gi`, `Ti` powers of 1024.
pub fn parse_quantity(text: &str) -> Result<u64, SizeError> {
    let (number, unit) = split(text, QUANTITY_UNITS)?;
    let multiplier: u64 = match unit {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(invalid(text, QUANTITY_UNITS)),
    };
    scale(text, number, multiplier)
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

/// The leading digits and the unit after them.
fn split<'a>(text: &'a str, expected: &'static str) -> Result<(u64, &'a str), SizeError> {
    let trimmed = text.trim();
    let at = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(at);
    let number = digits.parse().map_err(|_| invalid(text, expected))?;
    Ok((number, unit.trim()))
}

fn scale(text: &str, number: u64, multiplier: u64) -> Result<u64, SizeError> {
    number.checked_mul(multiplier).ok_or_else(|| SizeError::TooLarge(text.to_owned()))
}

fn invalid(text: &str, expected: &'static str) -> SizeError {
    SizeError::Invalid { text: text.to_owned(), expected }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_count_every_unit_in_powers_of_1024() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("2tb"), Ok(2 << 40));
        assert_eq!(parse_size(" 16 MiB "), Ok(16 << 20));
        assert!(matches!(parse_size("ten"), Err(SizeError::Invalid { .. })));
        assert!(matches!(parse_size(""), Err(SizeError::Invalid { .. })));
        assert!(matches!(parse_size("12 parsecs"), Err(SizeError::Invalid { .. })));
        assert!(matches!(parse_size("5PB"), Err(SizeError::Invalid { .. })));
        assert_eq!(parse_size("99999999999TiB"), Err(SizeError::TooLarge("99999999999TiB".into())));
        assert!(parse_size("ten").unwrap_err().to_string().contains("64MiB"));
    }

    #[test]
    fn quantities_follow_kubernetes() {
        assert_eq!(parse_quantity("1Gi"), Ok(1 << 30));
        assert_eq!(parse_quantity("500M"), Ok(500_000_000));
        assert_eq!(parse_quantity("1k"), Ok(1000));
        assert_eq!(parse_quantity("4096"), Ok(4096));
        assert!(matches!(parse_quantity("1Qi"), Err(SizeError::Invalid { .. })));
        assert!(matches!(parse_quantity("Gi"), Err(SizeError::Invalid { .. })));
        assert!(matches!(parse_quantity("1GiB"), Err(SizeError::Invalid { .. })), "not a Kubernetes unit");
        assert!(matches!(parse_quantity("99999999999Ti"), Err(SizeError::TooLarge(_))));
    }

    #[test]
    fn sizes_format_in_the_largest_whole_unit() {
        assert_eq!(format_size(64 << 20), "64MiB");
        assert_eq!(format_size(1536 << 20), "1.5GiB");
        assert_eq!(format_size(4097), "4.0KiB");
        assert_eq!(format_size(0), "0B");
    }
}
