//! One option parser for every attribute. Each attribute says which options it accepts, so
//! a misplaced option reads "`timeout` is not allowed on `#[flow]`".

use proc_macro2::{Span, TokenStream};
use syn::parse::Parser;

use crate::ctxt::Ctxt;

/// Every option any attribute knows.
const ALL: &[&str] = &[
    "timeout",
    "retries",
    "backoff",
    "max_backoff",
    "ambiguous",
    "version",
    "name",
    "crate",
    "migrate",
];

/// The options of a driver policy, on a trait or one of its methods.
pub const POLICY: &[&str] = &["timeout", "retries", "backoff", "max_backoff", "ambiguous"];

/// Options of one attribute, parsed at expansion time into plain values.
#[derive(Default)]
pub struct Options {
    pub timeout_ms: Option<u64>,
    pub retries: Option<u32>,
    pub backoff_ms: Option<u64>,
    pub max_backoff_ms: Option<u64>,
    /// `true` for `ambiguous = "park"`, `false` for `"retry"`.
    pub park: Option<bool>,
    pub version: Option<u32>,
    pub name: Option<String>,
    pub krate: Option<syn::Path>,
    /// `migrate = path` or `migrate = [oldest, .., newest]`: the functions upgrading a
    /// state one version each, ending at this version.
    pub migrate: Vec<syn::Path>,
}

/// Parses `a = "x", b = 3` for `#[attr]`, accepting only `allowed`.
pub fn parse(attr: &str, tokens: TokenStream, allowed: &[&str], cx: &mut Ctxt) -> Options {
    parse_on(attr, "", tokens, allowed, cx)
}

/// Like [`parse`], for an attribute in a place that changes what it accepts (`place` is
/// appended to its name in messages: "`#[driver]` methods").
pub fn parse_on(
    attr: &str,
    place: &str,
    tokens: TokenStream,
    allowed: &[&str],
    cx: &mut Ctxt,
) -> Options {
    let mut out = Options::default();
    let mut seen: Vec<String> = Vec::new();
    let accepts = if allowed.is_empty() {
        let verb = if place.is_empty() { "takes" } else { "take" };
        format!("`#[{attr}]`{place} {verb} no options")
    } else {
        format!(
            "`#[{attr}]`{place} accepts {}",
            allowed
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let parser = syn::meta::parser(|meta| {
        let path = &meta.path;
        let name = path
            .get_ident()
            .map_or_else(|| quote::quote!(#path).to_string(), ToString::to_string);
        if !ALL.contains(&name.as_str()) {
            return Err(meta.error(format!("unknown option `{name}`; {accepts}")));
        }
        if !allowed.contains(&name.as_str()) {
            return Err(meta.error(format!(
                "`{name}` is not allowed on `#[{attr}]`{place}; {accepts}"
            )));
        }
        if seen.contains(&name) {
            return Err(meta.error(format!("`{name}` is set twice")));
        }
        seen.push(name.clone());
        let duration = |meta: &syn::meta::ParseNestedMeta<'_>| -> syn::Result<u64> {
            let lit: syn::LitStr = meta.value()?.parse()?;
            parse_duration(&lit.value()).ok_or_else(|| {
                syn::Error::new(
                    lit.span(),
                    format!(
                        "invalid duration `{}`; write a number and a unit: \"500ms\", \"30s\", \"2m\", \"1h\"",
                        lit.value()
                    ),
                )
            })
        };
        match name.as_str() {
            "timeout" => out.timeout_ms = Some(duration(&meta)?),
            "backoff" => out.backoff_ms = Some(duration(&meta)?),
            "max_backoff" => out.max_backoff_ms = Some(duration(&meta)?),
            "ambiguous" => {
                let lit: syn::LitStr = meta.value()?.parse()?;
                out.park = Some(match lit.value().as_str() {
                    "retry" => false,
                    "park" => true,
                    other => {
                        return Err(syn::Error::new(
                            lit.span(),
                            format!(
                                "`ambiguous` is \"retry\" (send the call again after a restart) or \"park\" (quarantine the instance for an operator), not {other:?}"
                            ),
                        ));
                    }
                });
            }
            "retries" => {
                let lit: syn::LitInt = meta.value()?.parse()?;
                out.retries = Some(lit.base10_parse()?);
            }
            "version" => {
                let lit: syn::LitInt = meta.value()?.parse()?;
                let v: u32 = lit.base10_parse()?;
                if v == 0 {
                    return Err(syn::Error::new(lit.span(), "flow versions start at 1"));
                }
                out.version = Some(v);
            }
            "name" => {
                let lit: syn::LitStr = meta.value()?.parse()?;
                if lit.value().is_empty() {
                    return Err(syn::Error::new(lit.span(), "a flow name cannot be empty"));
                }
                out.name = Some(lit.value());
            }
            "crate" => {
                let lit: syn::LitStr = meta.value()?.parse()?;
                out.krate = Some(lit.parse()?);
            }
            "migrate" => {
                let value = meta.value()?;
                if value.peek(syn::token::Bracket) {
                    let list;
                    syn::bracketed!(list in value);
                    let paths =
                        syn::punctuated::Punctuated::<syn::Path, syn::Token![,]>::parse_terminated(
                            &list,
                        )?;
                    if paths.is_empty() {
                        return Err(meta.error("`migrate = []` lists no migration"));
                    }
                    out.migrate = paths.into_iter().collect();
                } else {
                    out.migrate = vec![value.parse()?];
                }
            }
            _ => unreachable!("every name in ALL is handled"),
        }
        Ok(())
    });
    if let Err(e) = parser.parse2(tokens) {
        cx.syn(e);
    }
    out
}

/// `"500ms"`, `"30s"`, `"2m"`, `"1h"` → milliseconds.
pub fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let factor = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    let ms = n.checked_mul(factor)?;
    (ms > 0).then_some(ms)
}

/// A `Policy` literal of the options' policy fields, for generated metadata.
pub fn policy(opts: &Options, p: &TokenStream) -> TokenStream {
    fn opt<T: quote::ToTokens>(v: Option<T>) -> TokenStream {
        match v {
            Some(v) => quote::quote!(::core::option::Option::Some(#v)),
            None => quote::quote!(::core::option::Option::None),
        }
    }
    let timeout = opt(opts.timeout_ms);
    let retries = opt(opts.retries);
    let backoff = opt(opts.backoff_ms);
    let max_backoff = opt(opts.max_backoff_ms);
    let ambiguous = opt(opts.park.map(|park| {
        if park {
            quote::quote!(#p::Ambiguous::Park)
        } else {
            quote::quote!(#p::Ambiguous::Retry)
        }
    }));
    quote::quote!(#p::Policy {
        timeout_ms: #timeout,
        retries: #retries,
        backoff_ms: #backoff,
        max_backoff_ms: #max_backoff,
        ambiguous: #ambiguous,
    })
}

/// The path generated code uses to reach flowwire.
pub fn krate(opts: &Options) -> TokenStream {
    match &opts.krate {
        Some(p) => quote::quote!(#p),
        None => quote::quote_spanned!(Span::call_site()=> ::flowwire),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_at_expansion_time() {
        assert_eq!(parse_duration("500ms"), Some(500));
        assert_eq!(parse_duration("30s"), Some(30_000));
        assert_eq!(parse_duration("2m"), Some(120_000));
        assert_eq!(parse_duration("1h"), Some(3_600_000));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("10d"), None);
    }

    #[test]
    fn a_misplaced_option_names_the_attribute_and_the_valid_ones() {
        let mut cx = Ctxt::default();
        parse(
            "flow",
            quote::quote!(timeout = "1s"),
            &["version", "name", "crate"],
            &mut cx,
        );
        let err = cx.check().unwrap_err().to_string();
        assert!(err.contains("`timeout` is not allowed on `#[flow]`; `#[flow]` accepts `version`, `name`, `crate`"), "{err}");
    }

    #[test]
    fn an_unknown_option_lists_the_valid_ones() {
        let mut cx = Ctxt::default();
        parse(
            "driver",
            quote::quote!(timout = "1s"),
            &["timeout", "retries"],
            &mut cx,
        );
        let err = cx.check().unwrap_err().to_string();
        assert!(err.contains("unknown option `timout`"), "{err}");
    }

    #[test]
    fn an_option_set_twice_is_an_error() {
        let mut cx = Ctxt::default();
        let o = parse(
            "driver",
            quote::quote!(retries = 1, retries = 2),
            &["retries"],
            &mut cx,
        );
        assert_eq!(o.retries, Some(1));
        assert!(cx.check().unwrap_err().to_string().contains("set twice"));
    }
}
