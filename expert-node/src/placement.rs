//! [`ExpertSet`]: which (layer, expert) pairs a node holds, as written on the command line.
//!
//! A spec is `all`, or comma-separated terms `[LAYERS:]EXPERTS`, each side a number, an
//! inclusive range `A-B` or `*`; a term without `LAYERS` applies to every MoE layer:
//! - `0-3` — experts 0 to 3 of every layer;
//! - `0,3,6` — experts 0, 3 and 6 of every layer;
//! - `0:0-7,1-3:4` — all 8 experts of layer 0, and expert 4 of layers 1 to 3.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Term {
    layers: Option<RangeInclusive<usize>>,
    experts: Option<RangeInclusive<usize>>,
}

/// A set of (layer, expert) pairs; see the module docs for the syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertSet {
    terms: Vec<Term>,
}

impl ExpertSet {
    pub fn all() -> Self {
        ExpertSet { terms: vec![Term { layers: None, experts: None }] }
    }

    /// The given experts of every layer.
    pub fn experts(experts: impl IntoIterator<Item = usize>) -> Self {
        let terms = experts.into_iter().map(|e| Term { layers: None, experts: Some(e..=e) }).collect();
        ExpertSet { terms }
    }

    pub fn contains(&self, layer: usize, expert: usize) -> bool {
        self.terms.iter().any(|t| {
            t.layers.as_ref().is_none_or(|r| r.contains(&layer))
                && t.experts.as_ref().is_none_or(|r| r.contains(&expert))
        })
    }

    /// Checks every number against a model with `layers` layers of `experts` experts.
    pub fn validate(&self, layers: usize, experts: usize) -> Result<(), String> {
        for t in &self.terms {
            if let Some(r) = &t.layers
                && *r.end() >= layers
            {
                return Err(format!("layer {} is out of range: the model has {layers} layers", r.end()));
            }
            if let Some(r) = &t.experts
                && *r.end() >= experts
            {
                return Err(format!("expert {} is out of range: the model has {experts} experts per layer", r.end()));
            }
        }
        Ok(())
    }
}

fn parse_range(s: &str, what: &str) -> Result<Option<RangeInclusive<usize>>, String> {
    let num = |n: &str| n.trim().parse::<usize>().map_err(|_| format!("`{n}` is not a valid {what} number"));
    let s = s.trim();
    if s == "*" {
        return Ok(None);
    }
    let range = match s.split_once('-') {
        Some((a, b)) => num(a)?..=num(b)?,
        None => num(s)?..=num(s)?,
    };
    if range.is_empty() {
        return Err(format!("{what} range `{s}` is empty"));
    }
    Ok(Some(range))
}

impl FromStr for ExpertSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "all" {
            return Ok(Self::all());
        }
        let terms = s
            .split(',')
            .map(|term| {
                let (layers, experts) = match term.split_once(':') {
                    Some((l, e)) => (parse_range(l, "layer")?, parse_range(e, "expert")?),
                    None => (None, parse_range(term, "expert")?),
                };
                Ok(Term { layers, experts })
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| format!("invalid expert spec `{s}`: {e}"))?;
        Ok(ExpertSet { terms })
    }
}

impl fmt::Display for ExpertSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = |r: &Option<RangeInclusive<usize>>| match r {
            None => "*".to_string(),
            Some(r) if r.start() == r.end() => r.start().to_string(),
            Some(r) => format!("{}-{}", r.start(), r.end()),
        };
        let terms: Vec<String> = self
            .terms
            .iter()
            .map(|t| match &t.layers {
                None => range(&t.experts),
                Some(_) => format!("{}:{}", range(&t.layers), range(&t.experts)),
            })
            .collect();
        f.write_str(&terms.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let s: ExpertSet = "0:0-7,1-3:4".parse().unwrap();
        assert!(s.contains(0, 7) && s.contains(2, 4) && !s.contains(1, 5) && !s.contains(4, 4));
        let s: ExpertSet = "0,3,6".parse().unwrap();
        assert!(s.contains(5, 3) && !s.contains(5, 4));
        assert!("all".parse::<ExpertSet>().unwrap().contains(9, 9));
        assert!("*:2".parse::<ExpertSet>().unwrap().contains(9, 2));
        assert_eq!("0:0-7,1-3:4".parse::<ExpertSet>().unwrap().to_string(), "0:0-7,1-3:4");
        assert_eq!(ExpertSet::experts([1, 4]).to_string(), "1,4");
    }

    #[test]
    fn rejects_bad_specs_naming_the_part() {
        assert!("x".parse::<ExpertSet>().unwrap_err().contains("`x` is not a valid expert number"));
        assert!("5-2".parse::<ExpertSet>().unwrap_err().contains("empty"));
        let s: ExpertSet = "0-8".parse().unwrap();
        assert_eq!(s.validate(2, 8).unwrap_err(), "expert 8 is out of range: the model has 8 experts per layer");
        let s: ExpertSet = "3:0".parse().unwrap();
        assert!(s.validate(2, 8).unwrap_err().contains("layer 3"));
    }
}
