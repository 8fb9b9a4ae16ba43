/** Fetches from the plugin's routes, relative to the iframe's base URL. */

import type { InfoResponse, MatrixResponse, Report, RunsResponse, SeriesResponse } from "./types";

async function getJson<T>(route: string, params: Record<string, string> = {}): Promise<T> {
  const query = new URLSearchParams(params).toString();
  const response = await fetch(query ? `${route}?${query}` : route, {
    headers: { Accept: "application/json" },
  });
  if (!response.ok) {
    throw new Error(`${route}: HTTP ${response.status}`);
  }
  return (await response.json()) as T;
}

export const fetchRuns = () => getJson<RunsResponse>("runs");
export const fetchReport = () => getJson<Report>("findings");
export const fetchSeries = (run: string, tag: string, source: string) =>
  getJson<SeriesResponse>("series", { run, tag, source });
export const fetchMatrix = (run: string, quantity: string) =>
  getJson<MatrixResponse>("matrix", { run, quantity });
export const fetchInfo = (run: string) => getJson<InfoResponse>("info", { run });
