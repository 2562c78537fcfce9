//! Typed, bounded label values. Each set is an enum with every value in `ALL`, so a series can
//! be given its zero before it is first used, and a value cannot drift from the list that
//! pre-seeds it.

/// Declares a label enum: its values, their text and `ALL`.
macro_rules! label_values {
    ($(#[$meta:meta])* $name:ident { $( $(#[$doc:meta])* $variant:ident = $text:literal, )* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$doc])* $variant, )*
        }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The label value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_values! {
    /// Why a request was not routed by its pool's policy (`llmlb_fallback_total{reason}`).
    FallbackReason {
        /// The request had no body.
        NoBody = "no_body",
        /// The body is not JSON.
        NotJson = "not_json",
        /// The JSON body has no prompt to route by.
        NoPrompt = "no_prompt",
        /// The state store did not answer in time.
        StoreTimeout = "store_timeout",
        /// The state store answered with an error.
        StoreError = "store_error",
        /// The store's circuit breaker is open.
        StoreBreakerOpen = "store_breaker_open",
        /// No candidate's engine metrics are known.
        MetricsUnknown = "metrics_unknown",
        /// No endpoint passes its health check; unhealthy ones are tried.
        NoHealthyEndpoint = "no_healthy_endpoint",
    }
}

impl FallbackReason {
    /// The request-shape reasons, possible in every pool.
    pub const REQUEST: &'static [FallbackReason] = &[
        Self::NoBody,
        Self::NotJson,
        Self::NoPrompt,
        Self::NoHealthyEndpoint,
    ];
    /// The reasons of policies that keep counts in a store.
    pub const STORE: &'static [FallbackReason] =
        &[Self::StoreTimeout, Self::StoreError, Self::StoreBreakerOpen];
}

label_values! {
    /// What asked for a reload (`llmlb_config_reloads_total{trigger}`).
    ReloadTrigger {
        /// SIGHUP.
        Sighup = "sighup",
        /// `POST /-/reload` on the admin listener.
        Admin = "admin",
    }
}

label_values! {
    /// How a reload ended (`llmlb_config_reloads_total{result}`).
    ReloadResult {
        /// The new configuration is in force.
        Ok = "ok",
        /// The file could not be read or is invalid; the running configuration stays.
        Invalid = "invalid",
        /// The new routing table could not be built; the running configuration stays.
        Failed = "failed",
    }
}
