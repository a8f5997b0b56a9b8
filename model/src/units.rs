//! Human-readable quantities on the command line.

/// Parses a byte count with an optional decimal (K, M, G) or binary (KiB, MiB, GiB) suffix.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| format!("`{s}` is not a byte count (e.g. 512MiB, 8G, 1000000)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("`{other}` is not a byte unit; use K, M, G, KiB, MiB or GiB")),
    };
    Ok((num * scale) as usize)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_byte_counts() {
        assert_eq!(super::parse_bytes("1000"), Ok(1000));
        assert_eq!(super::parse_bytes("2KiB"), Ok(2048));
        assert_eq!(super::parse_bytes("1.5G"), Ok(1_500_000_000));
        assert!(super::parse_bytes("12 parsecs").unwrap_err().contains("parsecs"));
    }
}
