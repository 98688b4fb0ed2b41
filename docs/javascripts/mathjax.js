// MathJax configuration for pymdownx.arithmatex (generic mode): typeset only the spans it emits.
// The MathJax script itself is referenced in mkdocs.yml (extra_javascript) and ships with the
// site (docs/_hooks/mathjax.py copies it in at build time), so formulas render offline. Without
// it the TeX source stays readable as text.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// Material's instant navigation swaps pages without a reload: typeset each new page.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
