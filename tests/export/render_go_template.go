// Renders an Ollama Modelfile TEMPLATE with Go's own text/template, over the values Ollama
// passes it: .Messages (each with .Role and .Content), .System, and .Prompt/.Response for
// templates of the older form. Usage: go run render_go_template.go TEMPLATE_FILE VALUES_JSON
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message `json:"messages"`
	System   string    `json:"system"`
	Prompt   string    `json:"prompt"`
	Response string    `json:"response"`
}

func main() {
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	raw, err := os.ReadFile(os.Args[2])
	if err != nil {
		panic(err)
	}
	var batch []Values
	if err := json.Unmarshal(raw, &batch); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(string(text)))
	var outputs []string
	for _, values := range batch {
		var out stringWriter
		if err := tmpl.Execute(&out, values); err != nil {
			panic(err)
		}
		outputs = append(outputs, out.String())
	}
	encoded, _ := json.Marshal(outputs)
	os.Stdout.Write(encoded)
}

type stringWriter struct{ buf []byte }

func (w *stringWriter) Write(p []byte) (int, error) { w.buf = append(w.buf, p...); return len(p), nil }
func (w *stringWriter) String() string              { return string(w.buf) }
