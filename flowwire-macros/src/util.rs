//! Small helpers shared by the expansions.

use quote::ToTokens;

/// `charge_card` → `ChargeCard`.
pub fn pascal(s: &str) -> String {
    s.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

/// A type as written, without the spaces `to_string` puts between tokens.
pub fn type_name(ty: &impl ToTokens) -> String {
    let raw = ty.to_token_stream().to_string();
    let mut out = String::with_capacity(raw.len());
    let mut prev = ' ';
    let chars: Vec<char> = raw.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c == ' ' {
            let next = chars.get(i + 1).copied().unwrap_or(' ');
            let glue =
                |x: char| matches!(x, '<' | '>' | ':' | '&' | '(' | ')' | '[' | ']' | ',' | ';');
            if glue(prev) && prev != ',' && prev != ';' || glue(next) && next != '&' || next == ','
            {
                continue;
            }
        }
        out.push(c);
        prev = c;
    }
    out
}

/// Whether an attribute is the marker `name` (`#[name]` or `#[path::name]`).
pub fn is_marker(attr: &syn::Attribute, name: &str) -> bool {
    attr.path().segments.last().is_some_and(|s| s.ident == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_as_written() {
        assert_eq!(pascal("charge_card"), "ChargeCard");
        let ty: syn::Type = syn::parse_quote!(Result<Vec<u8>, my::Error>);
        assert_eq!(type_name(&ty), "Result<Vec<u8>, my::Error>");
        let ty: syn::Type = syn::parse_quote!(&'static str);
        assert_eq!(type_name(&ty), "&'static str");
    }
}
