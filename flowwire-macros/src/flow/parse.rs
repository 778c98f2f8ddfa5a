//! Parse and validate both halves of a flow into models that keep their tokens for spans.

use quote::format_ident;
use syn::{FnArg, ImplItem, Pat, ReturnType, Type};

use crate::ctxt::Ctxt;
use crate::options::Options;
use crate::util::is_marker;

const LINK_SHAPE: &str =
    "a `#[link]` is the flow's state (`state: OrderState`) or a driver (`payment: impl Payment`)";

pub struct DriverLink<'a> {
    pub field: &'a syn::Ident,
    /// The driver trait's path.
    pub path: &'a syn::Path,
}

pub struct StructModel<'a> {
    pub original: &'a syn::ItemStruct,
    pub opts: Options,
    pub state_field: &'a syn::Ident,
    pub state_ty: &'a Type,
    pub drivers: Vec<DriverLink<'a>>,
}

/// The driver trait path of a link type written `impl Path`.
fn driver_path(ty: &Type) -> Option<Result<&syn::Path, &Type>> {
    let Type::ImplTrait(it) = ty else { return None };
    let mut paths = it.bounds.iter().filter_map(|b| match b {
        syn::TypeParamBound::Trait(t) => Some(&t.path),
        _ => None,
    });
    match (paths.next(), paths.next(), it.bounds.len()) {
        (Some(p), None, 1) if p.segments.iter().all(|s| s.arguments.is_none()) => Some(Ok(p)),
        _ => Some(Err(ty)),
    }
}

/// The proxy type for a driver trait path: `a::Payment` → `a::PaymentProxy`.
pub fn with_suffix(path: &syn::Path, suffix: &str) -> syn::Path {
    let mut p = path.clone();
    if let Some(last) = p.segments.last_mut() {
        last.ident = format_ident!("{}{}", last.ident, suffix);
    }
    p
}

pub fn parse_struct<'a>(
    item: &'a syn::ItemStruct,
    opts: Options,
    cx: &mut Ctxt,
) -> Option<StructModel<'a>> {
    if !item.generics.params.is_empty() {
        cx.error(
            &item.generics,
            "a flow cannot be generic: its instances are stored and resumed by name",
        );
    }
    let mut state: Option<(&syn::Ident, &Type)> = None;
    let mut drivers: Vec<DriverLink<'a>> = Vec::new();
    let syn::Fields::Named(fields) = &item.fields else {
        cx.error(
            &item.ident,
            format!("a flow board has named fields, each a `#[link]`; {LINK_SHAPE}"),
        );
        return None;
    };
    for f in &fields.named {
        let ident = f.ident.as_ref().expect("named fields have names");
        let links: Vec<_> = f.attrs.iter().filter(|a| is_marker(a, "link")).collect();
        if links.is_empty() {
            cx.error(
                f,
                format!("every field of a flow board is a `#[link]`; {LINK_SHAPE}"),
            );
            continue;
        }
        for l in &links {
            if !matches!(l.meta, syn::Meta::Path(_)) {
                cx.error(l, "`#[link]` takes no options");
            }
        }
        match driver_path(&f.ty) {
            Some(Ok(path)) => {
                if let Some(dup) = drivers.iter().find(|d| d.path == path) {
                    cx.error(
                        &f.ty,
                        format!(
                            "this driver is already linked as `{}`; link each driver once",
                            dup.field
                        ),
                    );
                }
                drivers.push(DriverLink { field: ident, path });
            }
            Some(Err(ty)) => cx.error(
                ty,
                "a driver link is `impl DriverTrait`: one trait, no generics, no extra bounds",
            ),
            None => match &f.ty {
                Type::Path(syn::TypePath { qself: None, .. }) | Type::Tuple(_) | Type::Array(_) => {
                    if let Some((first, _)) = state {
                        let ty = &f.ty;
                        let ty = quote::quote!(#ty).to_string();
                        cx.error(
                            &f.ty,
                            format!(
                                "a flow has one state link, and `{first}` is already the state: if `{ty}` is a driver trait, link it as `impl {ty}`; if it is more state, put both in one struct"
                            ),
                        );
                    } else {
                        state = Some((ident, &f.ty));
                    }
                }
                other => cx.error(
                    other,
                    format!("this field is neither state nor driver; {LINK_SHAPE}"),
                ),
            },
        }
    }
    if drivers.len() > usize::from(u16::MAX) {
        cx.error(&item.ident, "a flow links at most 65535 drivers");
    }
    let Some((state_field, state_ty)) = state else {
        cx.error(
            &item.ident,
            format!("a flow needs a state link, e.g. `#[link] state: OrderState`; {LINK_SHAPE}"),
        );
        return None;
    };
    Some(StructModel {
        original: item,
        opts,
        state_field,
        state_ty,
        drivers,
    })
}

/// The struct with `#[link]` removed and driver links replaced by their proxies.
pub fn strip_struct(item: &syn::ItemStruct) -> syn::ItemStruct {
    let mut item = item.clone();
    if let syn::Fields::Named(fields) = &mut item.fields {
        for f in &mut fields.named {
            f.attrs.retain(|a| !is_marker(a, "link"));
            if let Some(Ok(path)) = driver_path(&f.ty) {
                let proxy = with_suffix(path, "Proxy");
                f.ty = syn::parse_quote!(#proxy);
            }
        }
    }
    item
}

/// The struct a board with errors expands to: [`strip_struct`], with every state link after
/// the first given the type `()`, so that a bare driver trait written as a link
/// (`pay: Pay`) is reported once, by the macro, and not again by rustc as a trait used as a
/// type.
pub fn fallback_struct(item: &syn::ItemStruct) -> syn::ItemStruct {
    let mut out = strip_struct(item);
    let (syn::Fields::Named(original), syn::Fields::Named(stripped)) =
        (&item.fields, &mut out.fields)
    else {
        return out;
    };
    let mut state_seen = false;
    for (f, g) in original.named.iter().zip(stripped.named.iter_mut()) {
        if !f.attrs.iter().any(|a| is_marker(a, "link")) || driver_path(&f.ty).is_some() {
            continue;
        }
        if state_seen {
            g.ty = syn::parse_quote!(());
        }
        state_seen = true;
    }
    out
}

pub struct Arg<'a> {
    pub name: syn::Ident,
    pub ty: &'a Type,
}

pub struct Marked<'a> {
    pub original: &'a syn::ImplItemFn,
    pub args: Vec<Arg<'a>>,
}

pub struct ImplModel<'a> {
    pub original: &'a syn::ItemImpl,
    pub opts: Options,
    /// The flow's type path (`OrderCircuit`).
    pub self_path: &'a syn::Path,
    pub wire: &'a syn::ImplItemFn,
    pub impulses: Vec<Marked<'a>>,
    pub probes: Vec<Marked<'a>>,
    /// The `#[correlate]` method, and whether it returns an `Option`.
    pub correlate: Option<(&'a syn::ImplItemFn, bool)>,
}

/// The markers a method of a flow's impl block takes.
const MARKERS: [&str; 4] = ["wire", "impulse", "probe", "correlate"];

/// Whether a type is written `Option<..>` (the last path segment is `Option` with one
/// type argument).
fn is_option(ty: &Type) -> bool {
    let Type::Path(tp) = ty else { return false };
    tp.path.segments.last().is_some_and(|s| {
        s.ident == "Option"
            && matches!(&s.arguments, syn::PathArguments::AngleBracketed(a) if a.args.len() == 1)
    })
}

fn receiver_is(f: &syn::ImplItemFn, mutable: bool) -> bool {
    matches!(f.sig.inputs.first(), Some(FnArg::Receiver(r))
        if matches!(r.kind, syn::ReceiverKind::Reference(_, _, m) if m.is_some() == mutable))
}

fn plain_args<'a>(f: &'a syn::ImplItemFn, what: &str, cx: &mut Ctxt) -> Vec<Arg<'a>> {
    let mut args = Vec::new();
    for input in f.sig.inputs.iter().skip(1) {
        if let FnArg::Typed(pt) = input {
            match &*pt.pat {
                Pat::Ident(pi) if pi.by_ref.is_none() && pi.subpat.is_none() => args.push(Arg {
                    name: pi.ident.clone(),
                    ty: &pt.ty,
                }),
                other => cx.error(
                    other,
                    format!("{what} arguments are plain names (`reason: String`)"),
                ),
            }
        }
    }
    args
}

fn common_checks(f: &syn::ImplItemFn, what: &str, cx: &mut Ctxt) {
    if let Some(a) = &f.sig.asyncness {
        cx.error(
            a,
            format!("{what} methods are not `async`: flow code is deterministic and never waits"),
        );
    }
    if !f.sig.generics.params.is_empty() {
        cx.error(&f.sig.generics, format!("{what} methods cannot be generic"));
    }
}

pub fn parse_impl<'a>(
    item: &'a syn::ItemImpl,
    opts: Options,
    cx: &mut Ctxt,
) -> Option<ImplModel<'a>> {
    if let Some((path, _)) = &item.trait_ {
        cx.error(
            path,
            "`#[flow]` goes on the flow's inherent `impl` block, not on a trait impl",
        );
        return None;
    }
    if !item.generics.params.is_empty() {
        cx.error(&item.generics, "a flow cannot be generic");
    }
    let self_path = match &*item.self_ty {
        Type::Path(tp)
            if tp.qself.is_none() && tp.path.segments.iter().all(|s| s.arguments.is_none()) =>
        {
            &tp.path
        }
        other => {
            cx.error(
                other,
                "`#[flow]` goes on `impl YourFlow { .. }` for a `#[flow]` struct",
            );
            return None;
        }
    };
    let mut wire: Option<&syn::ImplItemFn> = None;
    let mut impulses = Vec::new();
    let mut probes = Vec::new();
    let mut correlate: Option<(&syn::ImplItemFn, bool)> = None;
    for it in &item.items {
        let ImplItem::Fn(f) = it else { continue };
        let marks: Vec<&syn::Attribute> = f
            .attrs
            .iter()
            .filter(|a| MARKERS.iter().any(|m| is_marker(a, m)))
            .collect();
        if marks.len() > 1 {
            cx.error(
                marks[1],
                "a method takes one of `#[wire]`, `#[impulse]`, `#[probe]`, `#[correlate]`",
            );
            continue;
        }
        let Some(mark) = marks.first() else { continue };
        if !matches!(mark.meta, syn::Meta::Path(_)) {
            let name = mark
                .path()
                .segments
                .last()
                .map(|s| s.ident.to_string())
                .unwrap_or_default();
            cx.error(mark, format!("`#[{name}]` takes no options"));
            continue;
        }
        if is_marker(mark, "wire") {
            if let Some(first) = wire {
                cx.error(
                    &f.sig.ident,
                    format!(
                        "a flow has one `#[wire]`; `{}` is already the wire",
                        first.sig.ident
                    ),
                );
                continue;
            }
            common_checks(f, "wire", cx);
            let ok_args = receiver_is(f, true) && f.sig.inputs.len() == 1;
            if !ok_args {
                cx.error(&f.sig.inputs, "the wire is `fn(&mut self) -> Command<Self>`: it takes `&mut self` and nothing else");
            }
            match &f.sig.output {
                ReturnType::Default => cx.error(
                    &f.sig.ident,
                    "the wire returns `Command<Self>`: what the runtime does next",
                ),
                ReturnType::Type(_, ty) if !names_command(ty) => cx.error(
                    ty,
                    "the wire returns `Command<Self>`: what the runtime does next (to fail the flow, return `Command::fail(reason)`; a `Result` is not unwrapped)",
                ),
                ReturnType::Type(..) => {}
            }
            wire = Some(f);
        } else if is_marker(mark, "impulse") {
            common_checks(f, "impulse", cx);
            if !receiver_is(f, true) {
                cx.error(
                    &f.sig.ident,
                    "an impulse takes `&mut self`: it changes the state",
                );
            }
            if let ReturnType::Type(_, ty) = &f.sig.output {
                cx.error(ty, "an impulse returns nothing: it changes the state, and the wire decides what follows; read values with a `#[probe]`");
            }
            impulses.push(Marked {
                original: f,
                args: plain_args(f, "impulse", cx),
            });
        } else if is_marker(mark, "correlate") {
            if let Some((first, _)) = correlate {
                cx.error(
                    &f.sig.ident,
                    format!(
                        "a flow has at most one `#[correlate]` method; `{}` already is its correlation key",
                        first.sig.ident
                    ),
                );
                continue;
            }
            common_checks(f, "correlate", cx);
            if !receiver_is(f, false) || f.sig.inputs.len() != 1 {
                let at: &dyn quote::ToTokens = match f.sig.inputs.first() {
                    Some(_) => &f.sig.inputs,
                    None => &f.sig.ident,
                };
                cx.error(at, "a correlation key is `fn(&self) -> impl Display` (or `Option<impl Display>` while the state has none): it takes `&self` and nothing else");
            }
            let optional = match &f.sig.output {
                ReturnType::Type(_, ty) => is_option(ty),
                ReturnType::Default => {
                    cx.error(&f.sig.ident, "a correlation key returns the key: `-> impl Display`, or `-> Option<impl Display>` while the state has none");
                    false
                }
            };
            correlate = Some((f, optional));
        } else {
            common_checks(f, "probe", cx);
            if !receiver_is(f, false) {
                let at: &dyn quote::ToTokens = match f.sig.inputs.first() {
                    Some(r) => r,
                    None => &f.sig.ident,
                };
                cx.error(at, "a probe takes `&self`: it reads the last persisted state and changes nothing; use an `#[impulse]` to change it");
            }
            probes.push(Marked {
                original: f,
                args: plain_args(f, "probe", cx),
            });
        }
    }
    let Some(wire) = wire else {
        cx.error(
            &item.self_ty,
            "a flow needs one `#[wire]` method: `#[wire] fn step(&mut self) -> Command<Self>`",
        );
        return None;
    };
    Some(ImplModel {
        original: item,
        opts,
        self_path,
        wire,
        impulses,
        probes,
        correlate,
    })
}

/// The impl block with its markers removed.
pub fn strip_impl(item: &syn::ItemImpl) -> syn::ItemImpl {
    let mut item = item.clone();
    for it in &mut item.items {
        if let ImplItem::Fn(f) = it {
            f.attrs.retain(|a| !MARKERS.iter().any(|m| is_marker(a, m)));
        }
    }
    item
}

/// Whether a type is spelled as a `Command<..>` (by its last path segment, so
/// `flowwire::Command<Self>` passes too; what it holds the compiler checks).
fn names_command(ty: &Type) -> bool {
    matches!(ty, Type::Path(tp) if tp.qself.is_none()
        && tp.path.segments.last().is_some_and(|s| s.ident == "Command"))
}
