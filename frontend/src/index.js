// Entry point: TensorBoard's plugin iframe imports this module and calls render().

import css from "./style.css";
import { App } from "./app.js";

export function render() {
  const sheet = new CSSStyleSheet();
  sheet.replaceSync(css);
  document.adoptedStyleSheets = [...document.adoptedStyleSheets, sheet];
  return new App(document.body).start();
}
