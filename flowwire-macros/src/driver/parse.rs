//! Parse and validate a `#[driver]` trait into a model that keeps its tokens for spans.

use syn::{FnArg, Pat, ReturnType, TraitItem};

use crate::ctxt::Ctxt;
use crate::options::Options;

pub struct Arg<'a> {
    pub name: syn::Ident,
    pub ty: &'a syn::Type,
}

pub struct Method<'a> {
    pub original: &'a syn::TraitItemFn,
    /// The method's own policy, from `#[driver(..)]` on it.
    pub opts: Options,
    pub args: Vec<Arg<'a>>,
    pub output: &'a syn::Type,
}

pub struct Model<'a> {
    pub original: &'a syn::ItemTrait,
    pub opts: Options,
    pub methods: Vec<Method<'a>>,
}

const SHAPE: &str = "write `async fn name(&self, ..) -> Result<T, E>;`";

pub fn parse<'a>(item: &'a syn::ItemTrait, opts: Options, cx: &mut Ctxt) -> Model<'a> {
    if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
        cx.error(
            &item.generics,
            "a driver trait cannot be generic: its calls cross process boundaries as plain data",
        );
    }
    let mut methods = Vec::new();
    for it in &item.items {
        let TraitItem::Fn(f) = it else {
            cx.error(it, format!("a driver trait holds only methods; {SHAPE}"));
            continue;
        };
        if let Some(m) = parse_method(f, cx) {
            methods.push(m);
        }
    }
    if item.items.is_empty() {
        cx.error(
            &item.ident,
            format!("a driver needs at least one method; {SHAPE}"),
        );
    }
    if methods.len() > usize::from(u16::MAX) {
        cx.error(&item.ident, "a driver has at most 65535 methods");
    }
    Model {
        original: item,
        opts,
        methods,
    }
}

fn parse_method<'a>(f: &'a syn::TraitItemFn, cx: &mut Ctxt) -> Option<Method<'a>> {
    let sig = &f.sig;
    let mut ok = true;
    let mut opts = Options::default();
    for attr in f
        .attrs
        .iter()
        .filter(|a| crate::util::is_marker(a, "driver"))
    {
        let tokens = match &attr.meta {
            syn::Meta::List(l) => l.tokens.clone(),
            syn::Meta::Path(_) => proc_macro2::TokenStream::new(),
            syn::Meta::NameValue(nv) => {
                cx.error(nv, "write `#[driver(retries = 0, ..)]` on a driver method");
                continue;
            }
        };
        opts = crate::options::parse_on("driver", " methods", tokens, crate::options::POLICY, cx);
    }
    if sig.asyncness.is_none() {
        cx.error(
            sig.fn_token,
            format!(
                "driver methods are `async fn`: a call runs on a worker and is awaited; {SHAPE}"
            ),
        );
        ok = false;
    }
    if !sig.generics.params.is_empty() {
        cx.error(
            &sig.generics,
            "driver methods cannot be generic: their arguments cross to a worker as plain data",
        );
        ok = false;
    }
    if let Some(body) = &f.default {
        cx.error(
            body,
            "driver methods have no default body: implementations provide them",
        );
        ok = false;
    }
    match sig.inputs.first() {
        Some(FnArg::Receiver(r)) => {
            let by_shared_ref = matches!(r.kind, syn::ReceiverKind::Reference(_, _, None));
            if !by_shared_ref {
                cx.error(r, "driver methods take `&self`: a driver serves many calls at once, and `self` by value or `&mut self` cannot");
                ok = false;
            }
        }
        _ => {
            cx.error(&sig.ident, "driver methods take `&self` first");
            ok = false;
        }
    }
    let mut args = Vec::new();
    for input in sig.inputs.iter().skip(1) {
        match input {
            FnArg::Typed(pt) if matches!(&*pt.ty, syn::Type::Reference(_)) => {
                cx.error(&pt.ty, borrowed(&pt.ty));
                ok = false;
            }
            FnArg::Typed(pt) => match &*pt.pat {
                Pat::Ident(pi) if pi.by_ref.is_none() && pi.subpat.is_none() => args.push(Arg {
                    name: pi.ident.clone(),
                    ty: &pt.ty,
                }),
                other => {
                    cx.error(other, "driver method arguments are plain names (`cents: u64`): they become the fields of the call");
                    ok = false;
                }
            },
            FnArg::Receiver(r) => {
                cx.error(r, "`self` must come first");
                ok = false;
            }
        }
    }
    let output = match &sig.output {
        ReturnType::Type(_, ty) => &**ty,
        ReturnType::Default => {
            cx.error(
                &sig.ident,
                format!("driver methods return `Result<T, E>`; {SHAPE}"),
            );
            return None;
        }
    };
    ok.then_some(Method {
        original: f,
        opts,
        args,
        output,
    })
}

/// Why a borrowed argument cannot be, and the owned type to write instead.
fn borrowed(ty: &syn::Type) -> String {
    let owned = match ty {
        syn::Type::Reference(r) => match &*r.elem {
            syn::Type::Path(p) if p.path.is_ident("str") => "`String`".to_string(),
            syn::Type::Slice(s) => {
                let elem = &s.elem;
                format!("`Vec<{}>`", quote::quote!(#elem))
            }
            other => format!("`{}`", quote::quote!(#other)),
        },
        _ => "an owned type".to_string(),
    };
    format!(
        "driver method arguments are owned: the call is stored and may run in another process or after a restart; write {owned}"
    )
}
