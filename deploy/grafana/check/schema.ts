// The shape of llm-lb's dashboard JSON, assembled from Grafana's own published types only:
//   - @grafana/schema: the dashboard ("x" = classic JSON model, schemaVersion 36+), panel, row,
//     variable and field-config types, and each panel plugin's Options / FieldConfig, all
//     generated from Grafana's CUE kinds;
//   - @grafana/grafana-foundation-sdk: the Prometheus query (dataquery) type, generated from the
//     same kinds (@grafana/schema does not ship the Prometheus one).
// Nothing here adds a rule of its own: it only (1) spells the generated enums as the JSON values
// they stand for, (2) plugs each panel plugin's Options and FieldConfig into the generic panel
// type, and (3) keeps open what Grafana's CUE keeps open (`...`: variables, annotations).
// check.mjs checks the dashboard against these types as object literals, so TypeScript rejects
// unknown keys, wrong types and values outside an enum.

import type * as g from '@grafana/schema';
import type * as prometheus from '@grafana/grafana-foundation-sdk/prometheus';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as stateTimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';
import type * as timeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

/** A generated type as JSON spells it: string enum members become their string values. */
type Json<T> = 0 extends 1 & T
  ? T // any
  : T extends string
    ? `${T}`
    : T extends number | boolean | null | undefined
      ? T // numeric enums accept their member values as they are
      : T extends readonly (infer U)[]
        ? Json<U>[]
        : T extends object
          ? { [K in keyof T]: Json<T[K]> }
          : T;

/** A struct Grafana's CUE schema leaves open (`...`): known keys typed, others allowed. */
type Open<T> = T & { [key: string]: unknown };

/** A Prometheus query as a panel target (Grafana's DataQuery requires `refId`). */
export type PrometheusTarget = Json<Omit<prometheus.Dataquery, '_implementsDataqueryVariant'>> & {
  refId: string;
};

/** A panel of plugin `Type`, with the plugin's Options and (if it has one) custom FieldConfig. */
type PanelOf<Type extends string, Options, Custom = never> = Json<
  Omit<g.Panel, 'type' | 'options' | 'fieldConfig' | 'targets'>
> & {
  type: Type;
  options: Json<Options>;
  fieldConfig: {
    defaults: Json<Omit<g.FieldConfig, 'custom'>> & ([Custom] extends [never] ? {} : { custom?: Json<Custom> });
    overrides: Json<g.FieldConfigSource['overrides']>;
  };
  targets: PrometheusTarget[];
};

export type TimeSeriesPanel = PanelOf<'timeseries', timeSeries.Options, timeSeries.FieldConfig>;
export type StatPanel = PanelOf<'stat', stat.Options>;
export type StateTimelinePanel = PanelOf<'state-timeline', stateTimeline.Options, stateTimeline.FieldConfig>;
export type Panel = TimeSeriesPanel | StatPanel | StateTimelinePanel;

/** The panel types check.mjs knows, by their JSON `type`. */
export interface Panels {
  timeseries: TimeSeriesPanel;
  stat: StatPanel;
  'state-timeline': StateTimelinePanel;
}

export type Row = Json<Omit<g.RowPanel, 'panels'>> & { panels: Panel[] };

export type Dashboard = Json<Omit<g.Dashboard, 'panels' | 'templating' | 'annotations'>> & {
  panels: (Panel | Row)[];
  templating: { list: Open<Json<g.VariableModel>>[] };
  annotations: { list: Open<Json<g.AnnotationQuery>>[] };
};
