-- wrk script: POST prepared request bodies to BENCH_PATH, rotating through them.
-- BENCH_BODIES: body files separated by ';'. BENCH_CONTENT_TYPE: their Content-Type.
-- BENCH_HEADER_LENGTHS: for binary v2 bodies, each body's Inference-Header-Content-Length.
local bodies, lengths = {}, {}
local counter = 0
local path = os.getenv("BENCH_PATH") or "/predict"
local content_type = os.getenv("BENCH_CONTENT_TYPE") or "application/octet-stream"

function init(args)
  for file in string.gmatch(os.getenv("BENCH_BODIES") or "", "[^;]+") do
    local f = assert(io.open(file, "rb"))
    bodies[#bodies + 1] = f:read("*all")
    f:close()
  end
  for n in string.gmatch(os.getenv("BENCH_HEADER_LENGTHS") or "", "[^;]+") do
    lengths[#lengths + 1] = n
  end
end

function request()
  counter = counter + 1
  local i = (counter % #bodies) + 1
  local headers = {["Content-Type"] = content_type}
  if lengths[i] and lengths[i] ~= "-" then
    headers["Inference-Header-Content-Length"] = lengths[i]
  end
  return wrk.format("POST", path, headers, bodies[i])
end
