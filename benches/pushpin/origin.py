# A GRIP origin for Pushpin: every GET /events?channel=X holds an SSE stream on channel X.
import sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from urllib.parse import urlparse, parse_qs

class Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        query = parse_qs(urlparse(self.path).query)
        channel = query.get("channel", ["chat"])[0]
        body = b": ok\n\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Grip-Hold", "stream")
        self.send_header("Grip-Channel", channel)
        self.send_header("Grip-Keep-Alive", "\\n; format=cstring; timeout=15")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Origin).serve_forever()
