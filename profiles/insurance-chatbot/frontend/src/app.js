// The chat UI: React from the npm registry (UMD builds, no JSX, so no build toolchain).
// REACT_APP_API_URL is /api: the browser reaches the backend through nginx.
(function () {
  var h = React.createElement;
  function App() {
    var state = React.useState(null);
    React.useEffect(function () {
      fetch("/api/info").then(function (r) { return r.json(); }).then(state[1]);
    }, []);
    return h("main", null, h("h1", null, "보험 챗봇"),
      h("pre", null, state[0] ? JSON.stringify(state[0], null, 2) : "loading"));
  }
  ReactDOM.createRoot(document.getElementById("root")).render(h(App));
})();
