-- gpulab-infer's nginx data plane (see nginx.py): ModelInfer calls (gRPC, and KServe v2 REST infer on the REST
-- port) are authorised here and proxied to the Triton replicas by nginx; everything else goes to the Python
-- gateway. Decisions (may this token call this model?) come from the Python gateway's authorize endpoint and are
-- cached for what is left of the Python gateway's own cache entry (at most the token cache's TTL); which replicas are available comes from its /replicas (its health checks and
-- breakers), read every health interval.

local M = {}
local decisions = ngx.shared.gpulab_decisions
local stats = ngx.shared.gpulab_metrics
-- per worker (no locks on the hot path): the Python gateway's verdicts and when they came, calls in flight
local verdicts, read_at, busy = {}, 0, {}  -- verdicts: name -> {up = true/false, status = "..."}

-- set by configure() from nginx.conf (init_by_lua): replicas are {name = "host:port", ip = ..., port = ...} (ip
-- "unix:<path>" and port 0 for a unix socket) with
-- http_ip and http_port where their HTTP endpoints are known; the platform key goes in key_header (gRPC) or
-- http_key_header (REST)
local ttl, platform_key, key_header, http_key_header, replicas, health_interval, authorize_socket, read_model =
  30, "", nil, nil, {}, 2, nil, true
local by_peer = {}  -- "ip:port" (as nginx reports it) -> replica
local turn = 0  -- round robin among replicas with equally few calls in flight
local BUCKETS = {0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}
local CODES = {[0] = "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
               "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
               "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}

local function peer(ip, port)
  if ip:sub(1, 5) == "unix:" then return ip end  -- nginx reports a unix socket peer as its address alone
  return (ip:find(":") and "[" .. ip .. "]" or ip) .. ":" .. port
end

-- the gRPC codes of the gateway's own errors as REST statuses, and Triton's REST statuses as gRPC codes (metrics):
-- gpulab.service.errors.STATUSES, passed to configure
local REST_STATUS, REST_CODE = {}, {}

function M.configure(options)
  ttl, platform_key, key_header, http_key_header = options.ttl, options.key, options.key_header, options.http_key_header
  replicas, health_interval, authorize_socket = options.replicas, options.health_interval, options.authorize_socket
  read_model = options.read_model
  REST_STATUS, REST_CODE = options.rest_status, options.rest_code
  for _, replica in ipairs(replicas) do
    by_peer[peer(replica.ip, replica.port)] = replica
    if replica.http_ip then by_peer[peer(replica.http_ip, replica.http_port)] = replica end
  end
end

local function rest()
  return ngx.var.gpulab_protocol == "rest"
end

-- The gateway's own error: gRPC status and message, or on the REST port the status for the code (or `status`)
-- with KServe's {"error": "<message>"}
local function rest_error(status, message)
  ngx.status = status
  ngx.header["content-type"] = "application/json"
  ngx.print('{"error": "', (message:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end)),
    '"}')
  return ngx.exit(ngx.HTTP_OK)  -- the answer is sent: end the request
end

local function fail(code, message, status)
  ngx.ctx.code = code
  if rest() then return rest_error(status or REST_STATUS[code] or 500, message) end
  ngx.header["content-type"] = "application/grpc"
  ngx.header["grpc-status"] = tostring(code)
  -- gRPC percent-encodes the message: '%' and bytes outside printable ASCII
  ngx.header["grpc-message"] = message:gsub("[^\32-\36\38-\126]", function(c)
    return string.format("%%%02X", c:byte())
  end)
  return ngx.exit(204)
end

local function varint(s, i)
  local value, shift = 0, 0
  while i <= #s do
    local byte = s:byte(i)
    value = value + (byte % 128) * 2 ^ shift
    i = i + 1
    if byte < 128 then return value, i end
    shift = shift + 7
  end
  return nil, i
end

-- The request body, to read from: in memory, or in the file nginx spooled a large one to.
-- read(i, n) gives n bytes from position i (1-based; fewer at the end); size is the body's length.
local function body_reader()
  ngx.req.read_body()
  local data = ngx.req.get_body_data()
  if data then return function(i, n) return data:sub(i, i + n - 1) end, #data end
  local path = ngx.req.get_body_file()
  local file = path and io.open(path, "rb")
  if not file then return function() return "" end, 0 end
  local size = file:seek("end")
  return function(i, n)
    file:seek("set", i - 1)
    return file:read(n) or ""
  end, size, file
end

local function varint_at(read, i)
  local value, next_i = varint(read(i, 10), 1)
  return value, i + next_i - 1
end

-- The model name: the one string field 1 at the top level of the gRPC message (the whole message is read, as
-- protobuf, which keeps the last of repeated fields, reads it). nil when the fast path cannot tell or should
-- not decide (compressed, malformed, no field 1, or field 1 more than once or of another wire type): the
-- Python gateway then decides, and refuses what it must, with the same answer for both planes.
local function model_name(read, size)
  local head = read(1, 5)
  if #head < 5 or head:byte(1) ~= 0 then return nil end
  local length = ((head:byte(2) * 256 + head:byte(3)) * 256 + head:byte(4)) * 256 + head:byte(5)
  if length + 5 ~= size then return nil end
  local i, name = 6, nil
  while i <= size do
    local key
    key, i = varint_at(read, i)
    if not key then return nil end
    local wire, field = key % 8, math.floor(key / 8)
    if field == 1 and (wire ~= 2 or name) then return nil end
    if wire == 2 then
      local n
      n, i = varint_at(read, i)
      if not n or i + n - 1 > size then return nil end
      if field == 1 then name = read(i, n) end
      i = i + n
    elseif wire == 0 then
      local value
      value, i = varint_at(read, i)
      if not value then return nil end
    elseif wire == 1 then
      i = i + 8
    elseif wire == 5 then
      i = i + 4
    else
      return nil
    end
  end
  if i ~= size + 1 then return nil end
  return name
end

-- GET path on the Python gateway's authorize socket (HTTP/1.1 over a kept-alive cosocket: subrequests do not
-- work under HTTP/2 here): status, Grpc-Status header, body
local function get(path, authorization)
  local sock = ngx.socket.tcp()
  sock:settimeout(10000)
  local ok, err = sock:connect("unix:" .. authorize_socket)
  if not ok then return nil, nil, err end
  local request = "GET " .. path .. " HTTP/1.1\r\nHost: gpulab-infer\r\n"
    .. (authorization and ("Authorization: " .. authorization .. "\r\n") or "") .. "\r\n"
  ok, err = sock:send(request)
  if not ok then return nil, nil, err end
  local line
  line, err = sock:receive("*l")
  if not line then return nil, nil, err end
  local status = tonumber(line:match("^HTTP/1%.%d (%d+)"))
  local length, grpc_status, cache_seconds = 0, nil, 0
  while true do
    line, err = sock:receive("*l")
    if not line then return nil, nil, err end
    if line == "" then break end
    local name, value = line:match("^([^:]+):%s*(.-)%s*$")
    name = name and name:lower()
    if name == "content-length" then length = tonumber(value) end
    if name == "grpc-status" then grpc_status = value end
    if name == "cache-seconds" then cache_seconds = tonumber(value) or 0 end
  end
  local body = length > 0 and sock:receive(length) or ""
  sock:setkeepalive(60000, 64)
  return status, grpc_status, body, cache_seconds
end

-- Every health interval, in each worker: each replica's verdict from the Python gateway. Verdicts older than
-- three intervals are ignored, so replicas count as available again if the Python gateway stops answering.
local function read_replicas(premature)
  if premature then return end
  local status, _, body = get("/replicas")
  if status ~= 200 then return end
  local fresh = {}
  for name, state, description in body:gmatch("([^\t\n]+)\t([^\t\n]+)\t([^\n]*)\n") do
    fresh[name] = {up = state == "up", status = description}
  end
  verdicts, read_at = fresh, ngx.now()
end

function M.watch_replicas()
  ngx.timer.at(0, read_replicas)
  ngx.timer.every(health_interval, read_replicas)
end

local function verdict(replica)
  return ngx.now() - read_at <= 3 * health_interval and verdicts[replica.name] or nil
end

local function available(replica)
  local v = verdict(replica)
  return not v or v.up
end

local function describe()
  local parts = {}
  for _, replica in ipairs(replicas) do
    local v = verdict(replica)
    parts[#parts + 1] = v and v.status or ("Triton replica " .. replica.name)
  end
  return table.concat(parts, "; ")
end

-- The available replica with the fewest calls in flight (from this worker) that this call has not tried yet
-- (round robin among equals); a call that was never sent is tried on the next one. Health reports lag (a
-- replica that just came back may still be reported down), so once the available ones have failed, the others
-- are tried too.
function M.balance(http)
  local balancer = require("ngx.balancer")
  local tried = ngx.ctx.tried
  if not tried then
    tried = {}
    ngx.ctx.tried = tried
    if #replicas > 1 then balancer.set_more_tries(#replicas - 1) end
  end
  turn = turn + 1
  local best, fewest
  for pass = 1, 2 do
    for i = 0, #replicas - 1 do
      local replica = replicas[(turn + i) % #replicas + 1]
      if not tried[replica] and (pass == 2 or available(replica)) then
        local calls = busy[replica] or 0
        if not best or calls < fewest then best, fewest = replica, calls end
      end
    end
    if best then break end
  end
  if not best then return ngx.exit(ngx.ERROR) end  -- not reached: nginx tries each replica at most once
  tried[best] = true
  local ok, err
  if http then
    ok, err = balancer.set_current_peer(best.http_ip, best.http_port)
  else
    ok, err = balancer.set_current_peer(best.ip, best.port)
  end
  if not ok then
    ngx.log(ngx.ERR, "gpulab: cannot use replica ", best.name, ": ", err)
    return ngx.exit(ngx.ERROR)
  end
  busy[best] = (busy[best] or 0) + 1  -- less one in log(), for each replica nginx reports tried
end

-- The replicas this request was sent to (or tried), as nginx reports them
local function peers_tried()
  local tried = {}
  for peer in (ngx.var.upstream_addr or ""):gmatch("[^,%s]+") do
    if by_peer[peer] then tried[#tried + 1] = by_peer[peer] end
  end
  return tried
end

-- Without per-model allow-lists the body is not read (reading it makes nginx buffer the request, and large
-- ones then stall now and then): the decision is the token's, and the call streams through.
function M.access()
  local model = nil
  if rest() then  -- the model is in the path
    if ngx.req.get_method() ~= "POST" then return ngx.exec("@python") end
    -- as the Python gateway: a decoded control character would break the URI nginx sends on
    if ngx.var.gpulab_path_model:find("%c") then return fail(3, "a model name has no control characters") end
    -- Triton gets the path that was checked (nginx's normalized one), not the client's raw one ("..", "//")
    ngx.req.set_uri(ngx.var.uri)
    ngx.var.gpulab_model = ngx.var.gpulab_path_model
    model = read_model and ngx.var.gpulab_path_model or nil
  elseif read_model then
    local read, size, file = body_reader()
    model = model_name(read, size)
    if file then file:close() end
    if not model then return ngx.exec("@python") end
    ngx.var.gpulab_model = model
  end
  local authorization = ngx.var.http_authorization
  if authorization and authorization:find("%c") then
    return fail(16, "authorization metadata must be 'token <hub token>' or 'bearer <hub token>'")
  end
  local key = ngx.encode_base64(ngx.sha1_bin(authorization or "")) .. " " .. (model or "")
  local decision = decisions:get(key)
  if not decision then
    local query = model and ("?model=" .. ngx.escape_uri(model)) or ""
    local status, grpc_status, body, cache_seconds = get("/authorize" .. query, authorization)
    if status == 200 then
      decision = "ok"
    elseif status == 401 or status == 403 then
      decision = (grpc_status or "7") .. " " .. body
    else
      return fail(14, "cannot check the token: " .. (status and body or tostring(body)))
    end
    -- kept only as long as the Python gateway still trusts its own answer: one revocation window, not two
    local seconds = math.min(ttl, cache_seconds)
    if seconds >= 0.001 then decisions:set(key, decision, seconds) end
  end
  if decision ~= "ok" then
    local code, message = decision:match("^(%d+) (.*)$")
    if tonumber(code) == 16 then ngx.var.gpulab_model = "" end
    return fail(tonumber(code), message)
  end
  local any = false
  for _, replica in ipairs(replicas) do any = any or available(replica) end
  if not any then return fail(14, "no Triton replica available: " .. describe()) end
  if rest() then ngx.var.gpulab_authorization = authorization or "" end  -- for @triton_500
  ngx.req.clear_header("authorization")
  if platform_key ~= "" then ngx.req.set_header(rest() and http_key_header or key_header, platform_key) end
  ngx.ctx.proxied = true
end

-- nginx answered 502/504 itself: the replica failed during the call, or none was left to try
function M.unavailable()
  local tried = {}
  for _, replica in ipairs(peers_tried()) do tried[#tried + 1] = replica.name end
  if #tried > 0 then
    return fail(14, "Triton replica " .. table.concat(tried, ", ") .. " failed (nginx: upstream status "
      .. (ngx.var.upstream_status or "-") .. ")", 502)
  end
  return fail(14, "no Triton replica available: " .. describe())
end

-- A method no route takes (nginx refuses TRACE itself): the methods the path takes, as the Python gateway names
-- them (its REST routes take POST for infer, GET for the rest)
function M.not_allowed()
  local allow = ngx.var.uri:find("/infer$") and "POST" or "GET"
  ngx.header["allow"] = allow
  return rest_error(405, ngx.req.get_method() .. " is not allowed here; use " .. allow)
end

function M.too_large(limit)
  return fail(8, "request larger than the gateway's limit of " .. limit .. " bytes")
end

function M.log()
  local code = ngx.ctx.code
  if not code and rest() then
    code = REST_CODE[ngx.status] or 2
  elseif not code then
    code = tonumber(ngx.var.upstream_trailer_grpc_status or "") or tonumber(ngx.header["grpc-status"] or "")
      or (ngx.status == 200 and 0 or 14)
  end
  local model = code ~= 5 and ngx.var.gpulab_model or ""
  stats:incr("r\t" .. model .. "\t" .. (CODES[code] or tostring(code)), 1, 0)
  local seconds = ngx.now() - ngx.req.start_time()
  for _, le in ipairs(BUCKETS) do
    if seconds <= le then stats:incr("b\t" .. le, 1, 0) end
  end
  stats:incr("b\t+Inf", 1, 0)
  stats:incr("s", seconds, 0)
  for _, replica in ipairs(peers_tried()) do
    busy[replica] = (busy[replica] or 1) - 1  -- counted in balance(); ngx.ctx does not outlive @unavailable
    if ngx.ctx.proxied then stats:incr("u\t" .. replica.name, 1, 0) end
  end
end

-- Prometheus text: the ModelInfer calls nginx handled, as the Python gateway names its metrics
function M.metrics()
  local requests, replica, buckets = {}, {}, {}
  for _, key in ipairs(stats:get_keys(0)) do
    local kind, a, b = key:match("^(%a)\t?([^\t]*)\t?(.*)$")
    local value = stats:get(key)
    if kind == "r" then
      requests[#requests + 1] = string.format('gpulab_infer_requests_total{rpc="ModelInfer",model="%s",code="%s"} %d',
        (a:gsub('[\\"]', "\\%0"):gsub("\n", "\\n")), b, value)
    elseif kind == "u" then
      replica[#replica + 1] = string.format('gpulab_infer_replica_requests_total{replica="%s"} %d', a, value)
    elseif kind == "b" then
      buckets[a] = value
    end
  end
  local out = {"# HELP gpulab_infer_requests_total RPCs by method, model and status code",
               "# TYPE gpulab_infer_requests_total counter"}
  for _, line in ipairs(requests) do out[#out + 1] = line end
  out[#out + 1] = "# HELP gpulab_infer_replica_requests_total Requests sent to each replica"
  out[#out + 1] = "# TYPE gpulab_infer_replica_requests_total counter"
  for _, line in ipairs(replica) do out[#out + 1] = line end
  out[#out + 1] = "# HELP gpulab_infer_request_seconds RPC latency at the gateway"
  out[#out + 1] = "# TYPE gpulab_infer_request_seconds histogram"
  for _, le in ipairs(BUCKETS) do
    out[#out + 1] = string.format('gpulab_infer_request_seconds_bucket{rpc="ModelInfer",le="%s"} %d', le,
      buckets[tostring(le)] or 0)
  end
  out[#out + 1] = string.format('gpulab_infer_request_seconds_bucket{rpc="ModelInfer",le="+Inf"} %d',
    buckets["+Inf"] or 0)
  out[#out + 1] = string.format('gpulab_infer_request_seconds_count{rpc="ModelInfer"} %d', buckets["+Inf"] or 0)
  out[#out + 1] = string.format('gpulab_infer_request_seconds_sum{rpc="ModelInfer"} %.6f', stats:get("s") or 0)
  ngx.header["content-type"] = "text/plain; version=0.0.4"
  ngx.print(table.concat(out, "\n"), "\n")
end

return M
